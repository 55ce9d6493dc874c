"""TEST-ONLY: what the rootless tests run AS the test user; prints one JSON document.

``python3 tests/rootless_probe.py tree DIR``: every path below DIR with its lstat, link target,
user xattrs and sha256 (or the errno that stopped us), never raising: a FUSE mount is only
readable by its owner, so the comparison's data must be gathered as that user (stdlib only).

``... access PATH...``: access(2) with R_OK, X_OK and W_OK, chdir, and a read of each path
(or the errno).

``... opener LAYERS_LOCK DIR...``: exercises ``UserNamespaceOpener`` on a layer's directories
(needs imgfs importable): ``prestart`` (it returns with the helper running), its uid map and
imports, opens through it, malformed requests, a restart after the
helper is killed, and the cost of an open (direct vs helper), in microseconds.

``... orphan``: starts an opener, prints the helper's pid, then is killed by the test (the
helper must die with it).
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import stat
import struct
import sys
import time
from typing import Any


def _sha256(path: bytes) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def tree(root: bytes) -> dict[str, dict[str, Any]]:
    found: dict[str, dict[str, Any]] = {}
    pending = [b""]
    while pending:
        rel = pending.pop()
        here = os.path.join(root, rel) if rel else root
        try:
            names = os.listdir(here)
        except OSError as exc:
            found.setdefault(os.fsdecode(rel) or ".", {})["list_error"] = exc.errno
            continue
        for name in names:
            child = os.path.join(rel, name) if rel else name
            path = os.path.join(root, child)
            st = os.lstat(path)
            entry: dict[str, Any] = {
                "mode": st.st_mode,
                "uid": st.st_uid,
                "gid": st.st_gid,
                "size": st.st_size if not stat.S_ISDIR(st.st_mode) else 0,
                "nlink": st.st_nlink if stat.S_ISREG(st.st_mode) else 0,
                "mtime_ns": st.st_mtime_ns,
                "ino": st.st_ino,
            }
            if stat.S_ISLNK(st.st_mode):
                entry["link"] = os.fsdecode(os.readlink(path))
            elif stat.S_ISREG(st.st_mode):
                try:
                    entry["sha256"] = _sha256(path)
                except OSError as exc:
                    entry["read_error"] = exc.errno
            if not stat.S_ISLNK(st.st_mode):
                try:
                    names_x = os.listxattr(path, follow_symlinks=False)
                    entry["xattrs"] = {
                        n: os.getxattr(path, n, follow_symlinks=False).hex()
                        for n in sorted(names_x)
                        if n.startswith("user.")
                    }
                except OSError as exc:
                    entry["xattr_error"] = exc.errno
            found[os.fsdecode(child)] = entry
            if stat.S_ISDIR(st.st_mode):
                pending.append(child)
    return found


def access(paths: list[str]) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for path in paths:
        entry: dict[str, Any] = {
            "R": os.access(path, os.R_OK),
            "X": os.access(path, os.X_OK),
            "W": os.access(path, os.W_OK),
        }
        try:
            os.chdir(path)
            entry["chdir"] = 0
        except OSError as exc:
            entry["chdir"] = exc.errno
        finally:
            os.chdir("/")
        try:
            if os.path.isdir(path):
                entry["read"] = sorted(os.listdir(path))
            else:
                with open(path, "rb") as f:
                    entry["read"] = f.read(64).decode("utf-8", "replace")
        except OSError as exc:
            entry["read"] = exc.errno
        out[path] = entry
    return out


def opener(lock_path: str, dirs: list[str]) -> dict[str, Any]:
    from imgfs.store import userns
    from imgfs.store.layerfiles import LayerFiles

    out: dict[str, Any] = {}
    began = time.monotonic()
    userns.prestart(os.path.dirname(lock_path))  # as the daemon does before it reports ready
    out["prestart_s"] = time.monotonic() - began
    out["prestarted"] = userns.shared_opener().pid is not None  # it waited for the helper
    userns.shared_opener().close()
    op = userns.UserNamespaceOpener()
    out["problem"] = op.problem()
    op.start()
    out["ping"] = op.ping()
    out["pid"] = op.pid
    out["joined"] = op.joined_pause_process
    out["pause_pid"] = pause = userns.pause_process_pid(op.identity)
    out["in_pause_userns"] = None
    if pause is not None and op.pid is not None:
        ns_of = [os.stat(f"/proc/{pid}/ns/user").st_ino for pid in (op.pid, pause)]
        out["in_pause_userns"] = ns_of[0] == ns_of[1]
    files = userns.UsernsLayerFiles(dirs, "probe", [lock_path], op)
    reads = {}
    for name, size in json.loads(os.environ["PROBE_FILES"]):
        try:
            fd = files.open(name.encode(), size)
        except Exception as exc:
            reads[name] = f"{type(exc).__name__}: {exc}"
            continue
        try:
            reads[name] = os.pread(fd, 64, 0).decode()
        finally:
            os.close(fd)
    out["reads"] = reads
    if "PROBE_BATCH" in os.environ:  # open_many: one round trip for what needs the helper
        trips: list[str] = []
        for attr in ("_request", "_request_many"):
            real = getattr(op, attr)

            def counted(*args: Any, _real: Any = real, _attr: str = attr) -> Any:
                trips.append(_attr)
                return _real(*args)

            setattr(op, attr, counted)
        out["batches"] = []
        for asked in json.loads(os.environ["PROBE_BATCH"]):  # a list of batches
            items = [(n.encode(), size) for n, size in asked]
            trips.clear()
            batch: list[str] = []  # in the order asked
            for (name, size), got in zip(items, files.open_many(items), strict=True):
                if got is None:  # left to open at its turn, as generation does
                    try:
                        got = files.open(name, size)
                    except Exception as exc:
                        got = exc
                if isinstance(got, Exception):
                    batch.append(f"{type(got).__name__}: {got}")
                    continue
                try:
                    batch.append(os.pread(got, 64, 0).decode())
                finally:
                    os.close(got)
            out["batches"].append({"got": batch, "trips": list(trips)})
        for attr in ("_request", "_request_many"):
            delattr(op, attr)
    # Malformed requests: the helper answers each with an error and keeps serving.
    helper = op._helper
    assert helper is not None
    answers = []
    for raw in (b"x", struct.pack("<BxxxIQ", 99, 0, 0), struct.pack("<BxxxIQ", 2, 12345, 1) + b"a"):
        helper.sock.sendmsg([raw])
        data = helper.sock.recv(4096)
        answers.append(data[12:].decode())
    r, w = os.pipe()  # a request carrying a descriptor: the descriptor is dropped
    socket.send_fds(helper.sock, [struct.pack("<BxxxIQ", 4, 0, 0)], [r])
    answers.append(helper.sock.recv(4096)[12:].decode())
    os.close(r)
    os.close(w)
    out["malformed"] = answers
    out["ping_after_malformed"] = op.ping()
    # Cost of an open: a readable file directly, the same through the helper.
    name, size = json.loads(os.environ["PROBE_COST_FILE"])
    direct = LayerFiles(dirs, "probe")
    remote = op.open_dirs(dirs, "probe")
    n = 2000

    def direct_open() -> int:
        return direct.open(name.encode(), size)

    def helper_open() -> int:
        return op.open(remote, name.encode(), size)

    for label, fn in (("direct_us", direct_open), ("helper_us", helper_open)):
        for _ in range(200):
            os.close(fn())
        best = []
        for _ in range(3):
            t = time.perf_counter()
            for _ in range(n):
                os.close(fn())
            best.append((time.perf_counter() - t) / n * 1e6)
        out[label] = min(best)
    direct.close()
    op.release(remote)
    # Restart: kill the helper, the next open starts a new one.
    old = op.pid
    assert old is not None
    os.kill(old, 9)
    time.sleep(0.2)
    fd = files.open(b"far", 4)
    out["after_kill"] = os.pread(fd, 64, 0).decode()
    os.close(fd)
    out["restarted"] = op.pid is not None and op.pid != old
    out["joined_after_restart"] = op.joined_pause_process
    files.close()
    op.close()
    out["closed_pid_gone"] = not os.path.exists(f"/proc/{old}")
    return out


def orphan() -> None:
    from imgfs.store import userns

    op = userns.UserNamespaceOpener()
    op.start()  # from the spawner thread, as the daemon does
    print(json.dumps({"pid": os.getpid(), "helper": op.pid}), flush=True)
    time.sleep(600)


def main() -> None:
    cmd = sys.argv[1]
    if cmd == "tree":
        print(json.dumps(tree(os.fsencode(sys.argv[2]))))
    elif cmd == "access":
        print(json.dumps(access(sys.argv[2:])))
    elif cmd == "opener":
        print(json.dumps(opener(sys.argv[2], sys.argv[3:])))
    elif cmd == "orphan":
        orphan()
    else:
        raise SystemExit(f"unknown command {cmd}")


if __name__ == "__main__":
    main()
