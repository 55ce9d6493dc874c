"""Finding the store as podman does: storage.conf search, env overrides, driver choice."""

from __future__ import annotations

from pathlib import Path

import pytest

import imgfs
from imgfs.errors import ConfigError
from imgfs.store import config
from tests import realstores


def _conf(tmp_path: Path, text: str) -> dict[str, str]:
    path = tmp_path / "storage.conf"
    path.write_text(text)
    return {"CONTAINERS_STORAGE_CONF": str(path), "HOME": str(tmp_path)}


def test_containers_storage_conf_is_honoured(tmp_path: Path) -> None:
    env = _conf(tmp_path, '[storage]\ndriver = "overlay2"\ngraphroot = "/x/g"\nrunroot = "/x/r"\n')
    cfg = config.resolve(env=env)
    assert (cfg.graphroot, cfg.runroot, cfg.driver) == ("/x/g", "/x/r", "overlay")
    assert cfg.conf_file == env["CONTAINERS_STORAGE_CONF"]


def test_missing_explicit_conf_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no such file"):
        config.resolve(env={"CONTAINERS_STORAGE_CONF": str(tmp_path / "nope")})


def test_storage_driver_env_overrides_the_file(tmp_path: Path) -> None:
    env = _conf(tmp_path, '[storage]\ndriver = "overlay"\ngraphroot = "/g"\n')
    assert config.resolve(env={**env, "STORAGE_DRIVER": "vfs"}).driver == "vfs"


@pytest.mark.parametrize(("name", "message"), [("zfs", "unsupported"), ("nope", "unknown")])
def test_bad_drivers_are_refused(tmp_path: Path, name: str, message: str) -> None:
    env = _conf(tmp_path, f'[storage]\ndriver = "{name}"\ngraphroot = "/g"\n')
    with pytest.raises(ConfigError, match=message):
        config.resolve(env=env)


def test_store_argument_picks_the_driver_whose_images_dir_exists(tmp_path: Path) -> None:
    env = _conf(tmp_path, '[storage]\ndriver = "overlay"\n')
    store = tmp_path / "store"
    (store / "vfs-images").mkdir(parents=True)
    assert config.resolve(str(store), env=env).driver == "vfs"
    (store / "overlay-images").mkdir()
    with pytest.raises(ConfigError, match="several drivers"):
        config.resolve(str(store), env=env)


def test_additional_image_stores_and_uid_expansion(tmp_path: Path) -> None:
    env = _conf(
        tmp_path,
        '[storage]\ndriver = "vfs"\ngraphroot = "/g/$UID"\n'
        '[storage.options]\nadditionalimagestores = ["/ais/one", "/ais/two"]\n',
    )
    cfg = config.resolve(env=env)
    assert cfg.additional_image_stores == ("/ais/one", "/ais/two")
    assert cfg.graphroot.startswith("/g/")
    assert cfg.graphroot[3:].isdigit()


def test_rootless_defaults_follow_xdg(tmp_path: Path) -> None:
    env = {
        "_CONTAINERS_ROOTLESS_UID": "1000",
        "HOME": str(tmp_path),
        "XDG_CONFIG_HOME": str(tmp_path / "cfg"),
        "XDG_DATA_HOME": str(tmp_path / "data"),
        "XDG_RUNTIME_DIR": str(tmp_path / "run"),
        "STORAGE_DRIVER": "vfs",
    }
    cfg = config.resolve(env=env)
    assert cfg.graphroot == str(tmp_path / "data" / "containers" / "storage")
    assert cfg.runroot == str(tmp_path / "run" / "containers")
    user_conf = tmp_path / "cfg" / "containers" / "storage.conf"
    user_conf.parent.mkdir(parents=True)
    user_conf.write_text('[storage]\ndriver = "vfs"\ngraphroot = "/mine"\n')
    assert config.resolve(env=env).graphroot == "/mine"


def test_invalid_toml_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="invalid TOML"):
        config.resolve(env=_conf(tmp_path, "[storage\n"))


def test_additional_image_store_images_are_served(
    real_stores: realstores.StoreSet, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ais = real_stores.store("vfs")
    primary = tmp_path / "primary"
    (primary / "vfs-images").mkdir(parents=True)
    conf = tmp_path / "storage.conf"
    conf.write_text(
        f'[storage]\ndriver = "vfs"\ngraphroot = "{primary}"\nrunroot = "{tmp_path}/run"\n'
        f'[storage.options]\nadditionalimagestores = ["{ais.root}"]\n'
    )
    monkeypatch.setenv("CONTAINERS_STORAGE_CONF", str(conf))
    store = imgfs.Store.open()
    tiny = real_stores.image("vfs", "tiny")
    image = store.image("localhost/tiny:v1")
    assert image.id == tiny.id
    layer = next(b for b in image.blobs() if b.kind == "layer")
    with image.open_blob(layer.digest) as f:
        assert f.read() == tiny.layer_paths()[0].read_bytes()
    assert not (primary / "vfs-layers").exists()  # nothing written to either store


def test_a_directory_without_images_is_no_store(tmp_path: Path) -> None:
    env = {"CONTAINERS_STORAGE_CONF": str(tmp_path / "none.conf"), "HOME": str(tmp_path)}
    (tmp_path / "none.conf").write_text("[storage]\n")
    with pytest.raises(imgfs.StoreNotFound, match="no store at"):
        config.resolve(str(tmp_path), env=env)
