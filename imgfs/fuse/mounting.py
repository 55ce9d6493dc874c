"""Everything about mounting that needs no pyfuse3: options, preflight, the mount table, unmount.

Owns: the FUSE mount options imgfs insists on and the list it accepts (checked before
``pyfuse3.init`` so a mistake is imgfs's own usage error), the options mount(8) adds that are
accepted and overridden, the checks that run before mounting (/dev/fuse, fusermount3, the
mountpoint), reading /proc/self/mountinfo and ``imgfs -u`` (``fusermount3 -u``, imgfs mounts
only). ``imgfs --list`` and ``imgfs -u`` run with this module alone: it must never import pyfuse3
or trio (the daemon module does), and it knows nothing of the store, the tree or exit codes.

Explicit and implicit options: ``-o`` on imgfs's own command line is explicit, so ``rw``,
``dev`` and ``suid`` are refused there. Options that reach imgfs through mount(8) (fstab,
``mount -t fuse.imgfs``, systemd ``.mount`` units: the ``mount.fuse.imgfs`` helper) are
implicit: mount(8) adds ``rw`` and fstab's ``defaults``, ``auto``, ``user`` … whatever the user
wrote, so they are accepted and the mount is read-only, ``nodev`` and ``nosuid`` anyway.

``default_permissions`` is always on, except for a rootless store mounted by its owner
(``kernel_checks=False``): the kernel would check the image's numeric owners against host users
and deny the owner the files of their subordinate uids, so imgfs checks every request itself.
"""

from __future__ import annotations

import errno
import grp
import logging
import os
import pwd
import shutil
import stat
import subprocess
from dataclasses import dataclass
from typing import Final

from imgfs.errors import FuseUnavailable, MountError, MountpointBusy, NotImgfsMount, UsageError

log = logging.getLogger(__name__)

FUSE_DEVICE = "/dev/fuse"
FUSERMOUNT = "fusermount3"
MOUNTINFO = "/proc/self/mountinfo"
FUSE_PACKAGE_HINT = "install the 'fuse3' package (apt-get install fuse3)"
FSTYPE: Final = "fuse.imgfs"

# Options imgfs always sets; the user cannot remove them.
_FIXED_OPTIONS = frozenset({"default_permissions", "ro", "nosuid", "nodev", "subtype=imgfs"})
# Options that would undo a fixed one, with the reason shown to the user.
_REFUSED_OPTIONS = {
    "rw": "imgfs is read-only; -o rw is not supported",
    "suid": "imgfs never honours set-user-ID bits; -o suid is not supported",
    "dev": "imgfs never serves device files; -o dev is not supported",
    "nodefault_permissions": "default_permissions is always on and cannot be turned off",
    "no_default_permissions": "default_permissions is always on and cannot be turned off",
}
_IMGFS_KEYS = frozenset({"uid", "gid", "umask"})
# What pyfuse3.init (libfuse 3's fuse_session_new and its mount code) accepts and imgfs can
# use, measured against libfuse 3.14: anything else is refused before init with imgfs's own
# message. ``rw``/``dev``/``suid`` (refused above) and ``blkdev``/``blksize`` (block-device
# file systems only) are accepted by libfuse but not here.
FUSE_FLAGS: Final = frozenset(
    {
        "allow_other", "allow_root", "auto_unmount", "debug", "default_permissions",
        "ro", "nosuid", "nodev", "exec", "noexec", "async", "sync", "dirsync", "atime", "noatime",
    }
)  # fmt: skip
FUSE_VALUED: Final = frozenset(
    {"fsname", "subtype", "max_read", "context", "fscontext", "defcontext", "rootcontext"}
)
# What mount(8) and fstab add or mean for mount(8) itself; dropped when they come from mount(8).
_MOUNT8_ONLY = frozenset(
    {
        "rw", "dev", "suid", "defaults", "auto", "noauto", "user", "nouser", "users", "owner",
        "group", "nofail", "_netdev", "relatime", "norelatime", "strictatime", "nostrictatime",
        "lazytime", "nolazytime", "diratime", "nodiratime", "iversion", "noiversion",
        "mand", "nomand", "loud", "silent",
    }
)  # fmt: skip
_MOUNT8_PREFIXES = ("x-", "comment=", "user=", "helper=")


@dataclass(frozen=True)
class MountOptions:
    """FUSE options to pass to ``pyfuse3.init`` plus imgfs's own ``uid``/``gid``/``umask``.

    ``uid``, ``gid`` and ``umask`` are for the operations (ownership and modes of the
    tree); they are never part of ``fuse_options``.
    """

    fuse_options: frozenset[str]
    uid: int | None = None
    gid: int | None = None
    umask: int | None = None


# --------------------------------------------------------------------------- options


def escape_option_value(value: str) -> str:
    """Escape ``value`` for one libfuse ``-o`` item: backslashes and commas get a backslash.

    libfuse passes options as ASCII, so other characters become ``?`` (the file system
    name is informational only; the mountpoint itself is passed separately).
    """
    escaped = value.replace("\\", "\\\\").replace(",", "\\,")
    return "".join(ch if " " <= ch <= "~" else "?" for ch in escaped)


def split_options(value: str) -> list[str]:
    """Split one ``-o`` argument on commas that are not escaped with a backslash."""
    items: list[str] = []
    current: list[str] = []
    chars = iter(value)
    for ch in chars:
        if ch == "\\":
            current.append(ch + next(chars, ""))
        elif ch == ",":
            items.append("".join(current))
            current = []
        else:
            current.append(ch)
    items.append("".join(current))
    return [item for item in items if item]


def is_mount8_option(item: str) -> bool:
    """True for an option that mount(8) or fstab adds for itself (dropped via mount(8))."""
    return item in _MOUNT8_ONLY or item.startswith(_MOUNT8_PREFIXES)


def parse_mount_options(
    values: list[str], fsname: str, *, via_mount: bool = False, kernel_checks: bool = True
) -> MountOptions:
    """Parse repeated ``-o`` arguments into the options for a mount named ``fsname``.

    ``fsname`` is the unescaped file system name shown in the mount table (the CLI passes
    ``imgfs:<store path>``); a user's own ``fsname=`` replaces it. Options outside the list
    libfuse accepts are a UsageError. With ``via_mount`` (the options came from mount(8)),
    mount(8)'s own options (``rw``, ``dev``, ``suid``, ``defaults``, ``_netdev``, ``x-*`` …)
    are dropped instead of refused: the mount stays read-only, nodev and nosuid. Without
    ``kernel_checks`` (a rootless store mounted by its owner; the adapter checks every request)
    ``default_permissions`` is left out, also when given.
    """
    fuse = set(_FIXED_OPTIONS)
    own: dict[str, int] = {}
    user_fsname: str | None = None
    for item in (item for value in values for item in split_options(value)):
        if via_mount and is_mount8_option(item):
            if item in _REFUSED_OPTIONS:
                log.debug("mount(8) passed -o %s; imgfs mounts read-only, nodev, nosuid", item)
            continue
        key, has_value, text = item.partition("=")
        _refuse(item, key, has_value)
        if key in _IMGFS_KEYS:
            own[key] = _parse_own_option(key, text, has_value)
        elif key == "fsname" and has_value:
            user_fsname = _ascii_option(item)
        else:
            fuse.add(_known_option(_ascii_option(item), key, has_value))
    fuse.add(user_fsname or f"fsname={escape_option_value(fsname)}")
    if not kernel_checks:
        fuse.discard("default_permissions")
    return MountOptions(
        fuse_options=frozenset(fuse), uid=own.get("uid"), gid=own.get("gid"), umask=own.get("umask")
    )


def _refuse(item: str, key: str, has_value: str) -> None:
    reason = _REFUSED_OPTIONS.get(item)
    if reason is None and key == "default_permissions" and has_value:
        reason = _REFUSED_OPTIONS["nodefault_permissions"]
    if reason is None and key == "subtype" and item != "subtype=imgfs":
        reason = "the file system type is always fuse.imgfs; -o subtype is not supported"
    if reason is not None:
        raise UsageError(reason)


def _ascii_option(item: str) -> str:
    if not item.isascii():
        raise UsageError(f"mount option {item!r} is not ASCII")
    return item


def _known_option(item: str, key: str, has_value: str) -> str:
    if (not has_value and item in FUSE_FLAGS) or (has_value and key in FUSE_VALUED):
        if key == "max_read" and not item[len("max_read=") :].isdigit():
            raise UsageError(f"mount option {item}: not a number")
        return item
    known = sorted(FUSE_FLAGS | {f"{k}=" for k in FUSE_VALUED} | {f"{k}=" for k in _IMGFS_KEYS})
    raise UsageError(f"unknown mount option '{item}' (known: {', '.join(known)})")


def _parse_own_option(key: str, text: str, has_value: str) -> int:
    if not has_value or not text:
        raise UsageError(f"mount option {key}= needs a value")
    if key == "umask":
        return _parse_umask(text)
    return _parse_id(key, text)


def _parse_umask(text: str) -> int:
    try:
        value = int(text, 8)
    except ValueError:
        raise UsageError(f"umask={text}: not an octal number") from None
    if not 0 <= value <= 0o777:
        raise UsageError(f"umask={text}: must be between 000 and 777")
    return value


def _parse_id(key: str, text: str) -> int:
    if text.isdigit():
        value = int(text)
        if value >= 2**32 - 1:
            raise UsageError(f"{key}={text}: out of range")
        return value
    try:
        if key == "uid":
            return pwd.getpwnam(text).pw_uid
        return grp.getgrnam(text).gr_gid
    except KeyError:
        kind = "user" if key == "uid" else "group"
        raise UsageError(f"{key}={text}: no such {kind}") from None


# --------------------------------------------------------------------------- preflight


def preflight(mountpoint: str) -> str:
    """Check that FUSE works and ``mountpoint`` can take a mount; return its real path."""
    check_fuse()
    return check_mountpoint(mountpoint)


def check_fuse() -> None:
    """Raise FuseUnavailable unless /dev/fuse opens and fusermount3 is on PATH."""
    try:
        fd = os.open(FUSE_DEVICE, os.O_RDWR | os.O_CLOEXEC)
    except FileNotFoundError:
        raise FuseUnavailable(
            f"FUSE is not available: {FUSE_DEVICE} does not exist; load the fuse kernel module "
            f"(modprobe fuse), pass the device into containers (--device {FUSE_DEVICE}) and "
            f"{FUSE_PACKAGE_HINT}"
        ) from None
    except OSError as exc:
        raise FuseUnavailable(
            f"FUSE is not available: cannot open {FUSE_DEVICE}: {exc.strerror}; "
            f"{FUSE_PACKAGE_HINT} and make sure this user may open the device"
        ) from None
    os.close(fd)
    fusermount()


def fusermount() -> str:
    """The path of fusermount3, or FuseUnavailable."""
    exe = shutil.which(FUSERMOUNT)
    if exe is None:
        raise FuseUnavailable(
            f"FUSE is not available: {FUSERMOUNT} was not found on PATH; {FUSE_PACKAGE_HINT}"
        )
    return exe


def check_mountpoint(mountpoint: str) -> str:
    """Return the real path of ``mountpoint`` (symlinks resolved) if a mount can go there."""
    real = os.path.realpath(mountpoint)
    try:
        st = os.stat(real)
    except FileNotFoundError:
        raise MountError(f"mountpoint does not exist: {mountpoint}") from None
    except OSError as exc:
        raise _stat_error(mountpoint, exc) from None
    if not stat.S_ISDIR(st.st_mode):
        raise MountError(f"mountpoint is not a directory: {mountpoint}")
    if is_mount_point(real):
        raise MountpointBusy(f"mountpoint busy: {mountpoint} is already a mount point")
    return real


def _stat_error(mountpoint: str, exc: OSError) -> MountError:
    if exc.errno == errno.ENOTCONN:
        return MountpointBusy(
            f"mountpoint busy: {mountpoint} is a dead FUSE mount ({exc.strerror}); "
            f"remove it with '{FUSERMOUNT} -u {mountpoint}'"
        )
    return MountError(f"cannot use mountpoint {mountpoint}: {exc.strerror}")


# --------------------------------------------------------------------------- mount table


def is_mount_point(path: str) -> bool:
    """True if ``path`` (a real path) is a mount point in this mount namespace."""
    try:
        return mount_type(path) is not None
    except OSError:
        return os.path.ismount(path)


def mount_type(path: str) -> str | None:
    """The file system type of the topmost mount at ``path`` (a real path), or None."""
    found: str | None = None
    with open(MOUNTINFO, encoding="utf-8", errors="surrogateescape") as mountinfo:
        for line in mountinfo:
            fields = line.split(" ")
            if len(fields) < 5 or _unescape_mountinfo(fields[4]) != path:
                continue
            # Optional fields end at "-"; the type follows it. Later lines are mounted on top.
            sep = fields.index("-", 6) if "-" in fields[6:] else len(fields) - 1
            found = fields[sep + 1] if sep + 1 < len(fields) else "unknown"
    return found


def _unescape_mountinfo(field: str) -> str:
    """Undo the kernel's octal escapes (``\\040`` for a space) in a mountinfo field."""
    parts = field.split("\\")
    out = [parts[0]]
    for part in parts[1:]:
        code, rest = part[:3], part[3:]
        if len(code) == 3 and all(c in "01234567" for c in code):
            out.append(chr(int(code, 8)) + rest)
        else:
            out.append("\\" + part)
    return "".join(out)


# --------------------------------------------------------------------------- unmount


def unmount(mountpoint: str) -> None:
    """Unmount an imgfs mount with ``fusermount3 -u``; refuse any other file system."""
    exe = fusermount()
    path = os.path.realpath(mountpoint)
    try:
        fstype = mount_type(path)
    except OSError as exc:
        raise MountError(f"cannot read {MOUNTINFO}: {exc.strerror}") from None
    if fstype is None:
        raise MountError(f"not mounted: {mountpoint}")
    if fstype != FSTYPE:
        raise NotImgfsMount(f"not an imgfs mount ({fstype}): {mountpoint}")
    result = subprocess.run([exe, "-u", path], capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise _unmount_error(mountpoint, result.stderr)
    log.info("unmounted %s", path)


def _strip_program(line: str) -> str:
    program, sep, rest = line.partition(": ")
    return rest if sep and program.endswith(FUSERMOUNT) else line


def _unmount_error(mountpoint: str, stderr: str) -> MountError:
    lines = [_strip_program(line).strip() for line in stderr.splitlines()]
    reason = "; ".join(line for line in lines if line) or "fusermount3 failed"
    if "busy" in reason.lower():
        return MountpointBusy(
            f"mountpoint busy: cannot unmount {mountpoint}: {reason}; close the files and "
            f"directories still open under it (or detach lazily: {FUSERMOUNT} -u -z {mountpoint})"
        )
    return MountError(f"cannot unmount {mountpoint}: {reason}")
