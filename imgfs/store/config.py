"""Where the store is: storage.conf search, graph root, run root and driver.

Owns: the containers/storage configuration rules a reader needs (file search order for root
and rootless users, ``$UID``/env expansion, driver choice and aliases, additional image stores).
Must not know: the store's content (it only checks which ``<driver>-images`` directories exist,
never through a symlink).
"""

from __future__ import annotations

import os
import stat
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from imgfs.errors import ConfigError, StoreNotFound

SUPPORTED_DRIVERS = ("overlay", "vfs", "btrfs")
KNOWN_DRIVERS = ("overlay", "vfs", "btrfs", "zfs", "aufs", "devicemapper")
_ALIASES = {"overlay2": "overlay"}
_MAX_CONF_BYTES = 1 << 20


@dataclass(frozen=True)
class StoreConfig:
    """The resolved location of one store: where to read and with which driver."""

    graphroot: str
    runroot: str
    driver: str
    imagestore: str | None = None
    additional_image_stores: tuple[str, ...] = ()
    transient_store: bool = False
    conf_file: str | None = None


def resolve(
    graphroot: str | None = None,
    runroot: str | None = None,
    driver: str | None = None,
    env: Mapping[str, str] | None = None,
) -> StoreConfig:
    """Resolve the store as podman would, with explicit arguments taking precedence."""
    env = os.environ if env is None else env
    rootless = _is_rootless(env)
    conf_path, conf = _load_conf(env, rootless)
    storage = _table(conf, "storage")
    options = _table(storage, "options")
    root = (
        graphroot
        or _conf_path(storage, "graphroot", env)
        or _default_graphroot(storage, rootless, env)
    )
    run = runroot or _conf_path(storage, "runroot", env) or _default_runroot(rootless, env)
    chosen = _choose_driver(driver, graphroot, storage, env, root)
    return StoreConfig(
        graphroot=os.path.abspath(root),
        runroot=os.path.abspath(run),
        driver=chosen,
        imagestore=_conf_path(storage, "imagestore", env),
        additional_image_stores=_additional_stores(options, env),
        transient_store=bool(storage.get("transient_store", False)),
        conf_file=conf_path,
    )


def normalize_driver(name: str) -> str:
    """Map aliases to driver names; refuse unknown and unsupported drivers."""
    name = _ALIASES.get(name, name)
    if name not in KNOWN_DRIVERS:
        raise ConfigError(f"unknown storage driver {name!r} (supported: overlay, vfs, btrfs)")
    if name not in SUPPORTED_DRIVERS:
        raise ConfigError(f"unsupported storage driver {name!r} (supported: overlay, vfs, btrfs)")
    return name


def drivers_in(graphroot: str) -> list[str]:
    """The drivers whose ``<driver>-images`` directory exists in ``graphroot`` as a real
    directory: a symlink named like one never picks the driver (nothing below the graph root
    is followed)."""
    found = []
    for name in KNOWN_DRIVERS:
        try:
            st = os.lstat(os.path.join(graphroot, f"{name}-images"))
        except OSError:
            continue
        if stat.S_ISDIR(st.st_mode):
            found.append(name)
    return found


def _choose_driver(
    explicit: str | None,
    store_arg: str | None,
    storage: Mapping[str, object],
    env: Mapping[str, str],
    graphroot: str,
) -> str:
    if explicit:
        return normalize_driver(explicit)
    if store_arg and (found := _driver_in(graphroot)):
        return found
    configured = env.get("STORAGE_DRIVER") or _conf_str(storage, "driver")
    if configured:
        return normalize_driver(configured)
    if found := _driver_in(graphroot):
        return found
    if store_arg:
        raise StoreNotFound(f"no store at {graphroot}: no <driver>-images directory in it")
    raise ConfigError(
        f"no storage driver configured and no <driver>-images directory in {graphroot}"
    )


def _driver_in(graphroot: str) -> str | None:
    """The one driver with images in ``graphroot``; None if none; an error if several."""
    present = drivers_in(graphroot)
    if len(present) > 1:
        raise ConfigError(
            f"{graphroot} holds images of several drivers ({', '.join(present)}): "
            "choose one with --driver"
        )
    return normalize_driver(present[0]) if present else None


def _is_rootless(env: Mapping[str, str]) -> bool:
    if os.geteuid() != 0:
        return True
    return bool(env.get("_CONTAINERS_ROOTLESS_UID")) and env.get("_CONTAINERS_ROOTLESS_UID") != "0"


def _home(env: Mapping[str, str]) -> str:
    return env.get("HOME") or os.path.expanduser("~")


def _conf_candidates(env: Mapping[str, str], rootless: bool) -> list[str]:
    if rootless:
        xdg = env.get("XDG_CONFIG_HOME") or os.path.join(_home(env), ".config")
        user = os.path.join(xdg, "containers", "storage.conf")
        return [user, "/etc/containers/storage.conf", "/usr/share/containers/storage.conf"]
    return ["/etc/containers/storage.conf", "/usr/share/containers/storage.conf"]


def _load_conf(env: Mapping[str, str], rootless: bool) -> tuple[str | None, dict[str, object]]:
    explicit = env.get("CONTAINERS_STORAGE_CONF")
    if explicit:
        if not os.path.exists(explicit):
            raise ConfigError(f"CONTAINERS_STORAGE_CONF={explicit}: no such file")
        return explicit, _read_toml(explicit)
    for candidate in _conf_candidates(env, rootless):
        if os.path.exists(candidate):
            conf = _read_toml(candidate)
            if rootless and not candidate.startswith(("/etc/", "/usr/")):
                return candidate, conf
            if rootless:
                return candidate, _rootless_view(conf)
            return candidate, conf
    return None, {}


def _rootless_view(conf: dict[str, object]) -> dict[str, object]:
    """A system file seen by a rootless user: only rootless_storage_path and driver count."""
    storage = _table(conf, "storage")
    kept: dict[str, object] = {}
    if isinstance(storage.get("rootless_storage_path"), str):
        kept["rootless_storage_path"] = storage["rootless_storage_path"]
    if isinstance(storage.get("driver"), str):
        kept["driver"] = storage["driver"]
    return {"storage": kept}


def _read_toml(path: str) -> dict[str, object]:
    try:
        with open(path, "rb") as f:
            data = f.read(_MAX_CONF_BYTES + 1)
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror}") from exc
    if len(data) > _MAX_CONF_BYTES:
        raise ConfigError(f"{path}: larger than {_MAX_CONF_BYTES} bytes")
    try:
        return tomllib.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"{path}: invalid TOML: {exc}") from exc


def _table(conf: Mapping[str, object], key: str) -> dict[str, object]:
    value = conf.get(key, {})
    if not isinstance(value, dict):
        raise ConfigError(f"storage.conf: [{key}] is not a table")
    return value


def _conf_str(table: Mapping[str, object], key: str) -> str | None:
    value = table.get(key)
    if value is None or value == "":
        return None
    if not isinstance(value, str):
        raise ConfigError(f"storage.conf: {key} is not a string")
    return value


def _expand(value: str, env: Mapping[str, str]) -> str:
    value = value.replace("$UID", str(os.geteuid()))
    for name in sorted(env, key=len, reverse=True):
        value = value.replace("${" + name + "}", env[name]).replace("$" + name, env[name])
    return value


def _conf_path(table: Mapping[str, object], key: str, env: Mapping[str, str]) -> str | None:
    value = _conf_str(table, key)
    return _expand(value, env) if value else None


def _default_graphroot(
    storage: Mapping[str, object], rootless: bool, env: Mapping[str, str]
) -> str:
    if not rootless:
        return "/var/lib/containers/storage"
    configured = _conf_path(storage, "rootless_storage_path", env)
    if configured:
        return configured
    data = env.get("XDG_DATA_HOME") or os.path.join(_home(env), ".local", "share")
    return os.path.join(data, "containers", "storage")


def _default_runroot(rootless: bool, env: Mapping[str, str]) -> str:
    if not rootless:
        return "/run/containers/storage"
    runtime = env.get("XDG_RUNTIME_DIR")
    if runtime:
        return os.path.join(runtime, "containers")
    uid = os.geteuid()
    user_run = Path(f"/run/user/{uid}")
    try:
        st = user_run.stat()
        if st.st_uid == uid and not st.st_mode & 0o022:
            return str(user_run / "containers")
    except OSError:
        pass
    tmp = env.get("TMPDIR") or "/tmp"
    return os.path.join(tmp, f"storage-run-{uid}", "containers")


def _additional_stores(options: Mapping[str, object], env: Mapping[str, str]) -> tuple[str, ...]:
    opts = env.get("STORAGE_OPTS")
    if opts is not None:
        found = [
            part.split("=", 1)[1]
            for part in opts.split(",")
            if part.split("=", 1)[0].strip() in ("additionalimagestore", "additionalimagestores")
            and "=" in part
        ]
        return tuple(os.path.abspath(p) for p in found if p)
    value = options.get("additionalimagestores", [])
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ConfigError("storage.conf: additionalimagestores is not a list of strings")
    return tuple(os.path.abspath(_expand(v, env)) for v in value if v)
