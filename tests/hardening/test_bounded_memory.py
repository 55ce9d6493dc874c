"""Area 12: bounded memory whatever the store says (issue 10 class 5, the part done so far).

A 2048-layer overlay chain (one tiny file per layer): listing the image, its blobs and its
``rootfs/`` and reading files of the top and bottom layers must stay within the daemon's
memory budget (300 MiB) in both modes. Describing the chain is linear in its depth (the
layer IDs are shared by the chain's sources; a layer's lower directories are opened only
when a file is not in its own), where it was quadratic (2.5 s and +75 MiB for 1024 layers).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests import storemaker, tarsplit_maker
from tests.hardening import harden
from tests.hardening.harden import Counts

pytestmark = pytest.mark.usefixtures("fuse_required")

AREA = "12 bounded memory"
DEPTH = 2048
BUDGET_MIB = 300.0


@pytest.fixture(scope="module")
def deep(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, storemaker.MadeImage]:
    root = tmp_path_factory.mktemp("deep") / "root"
    maker = storemaker.StoreMaker(root)
    tars = [tarsplit_maker.make_tar([(f"f{i}", b"%d\n" % i)]) for i in range(DEPTH)]
    image = maker.add_image("localhost/deep:1", tars)
    maker.write()
    return root, image


@pytest.mark.parametrize("mode", ["snapshots", "direct"])
def test_a_deep_layer_chain_stays_within_the_budget(
    deep: tuple[Path, storemaker.MadeImage], tmp_path: Path, counts: Counts, mode: str
) -> None:
    root, image = deep
    extra = ("--direct",) if mode == "direct" else ()
    with harden.daemon(root, tmp_path / "run", tmp_path, *extra) as d:
        top = d.mnt / image.id
        assert "manifest.json" in [p.name for p in top.iterdir()]
        assert len(list((top / "blobs").iterdir())) == DEPTH + 2  # layers, config, manifest
        names = {p.name for p in (top / "rootfs").iterdir()}
        assert names == {f"f{i}" for i in range(DEPTH)}
        assert (top / "rootfs" / f"f{DEPTH - 1}").read_bytes() == b"%d\n" % (DEPTH - 1)
        assert (top / "rootfs" / "f0").read_bytes() == b"0\n"
        rss = harden.peak_rss_mib(d.pid)
    counts.add(AREA, f"attacks run ({mode})")
    counts.peak(AREA, f"daemon peak RSS MiB, {DEPTH}-layer chain ({mode})", rss)
    counts.put(AREA, "memory budget, MiB", BUDGET_MIB)
    assert rss < BUDGET_MIB
