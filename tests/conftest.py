"""Shared fixtures and helpers: the real data beside the project, the CLI, reading outputs
back with the reference NGFF reader, tiny synthetic images.

Helpers are imported by the tests (``from conftest import cli``); fixtures are found by
pytest.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("PIPELINE_TEST_DATA", ROOT.parent / "shared" / "data"))
#: ``pipeline run`` options for small, fast runs of real processes: the identity model,
#: tiles of 32 with overlap 8 in chunks of 32 and blocks of 64, every tile computed
#: (a 150 x 200 slide makes 12 blocks).
SMALL_RUN = (
    "--backend",
    "identity",
    "--tile",
    "32",
    "--overlap",
    "8",
    "--chunk",
    "32",
    "--block",
    "64",
    "--no-skip-background",
)


@pytest.fixture(scope="session")
def data_dir() -> Path:
    """``../shared/data``: real slides and volumes (read-only; copy before changing)."""
    if not DATA.is_dir():
        pytest.skip(f"real test data not found at {DATA} (set PIPELINE_TEST_DATA)")
    return DATA


@pytest.fixture(scope="module")
def one_thread():
    """Tiny networks run far faster on one torch thread than on two contended ones."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def tile_reads(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Counts compressed tiles/strips read from disk: by the pipeline's direct reader
    (one-page levels) and by tifffile's Zarr store (other levels)."""
    import tifffile.zarr

    from pipeline.io.tiff_tiles import TiffTiles

    reads: list[int] = []

    def counted(original):
        def counting(self, *args, **kwargs):
            reads.append(1)
            return original(self, *args, **kwargs)

        return counting

    monkeypatch.setattr(tifffile.zarr.FileCache, "read", counted(tifffile.zarr.FileCache.read))
    monkeypatch.setattr(TiffTiles, "read_segment", counted(TiffTiles.read_segment))
    return reads


def cli(*args: object):
    """``pipeline ARGS...`` through click's CliRunner (exceptions propagate)."""
    from click.testing import CliRunner

    from pipeline.cli import main

    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def output_dirs(out: Path) -> list[str]:
    """The folders in OUT besides the group that lists its images (``OME``), the folders
    of previews and GeoJSON files, and the hidden ``.pipeline`` folder of the run ledger,
    sorted."""
    from pipeline.io.collection import RESERVED_NAMES

    return sorted(
        p.name
        for p in out.iterdir()
        if p.is_dir() and p.name.lower() not in RESERVED_NAMES and p.name[0] != "."
    )


def image_dirs(out: Path) -> list[Path]:
    """The image groups in OUT (see :func:`output_dirs`), sorted."""
    return [out / name for name in output_dirs(out)]


def ngff_images(out: Path) -> dict:
    """Read every image OUT lists with the ome-zarr reference reader: name -> image node."""
    from ome_zarr.io import parse_url
    from ome_zarr.reader import Multiscales, Reader

    from pipeline.io.collection import read_collection

    images = {}
    for child in [out / name for name in read_collection(out) or ()]:
        nodes = list(Reader(parse_url(str(child)))())
        assert nodes, f"ome-zarr found no image in {child}"
        node = nodes[0]
        assert any(isinstance(s, Multiscales) for s in node.specs)
        images[child.name] = node
    return images


def write_tiff(path: Path, image: np.ndarray, *, um: float | None = None, **kwargs) -> Path:
    """A TIFF of ``image`` (tifffile options in ``kwargs``), calibrated at ``um`` µm per
    pixel through its resolution tags when given."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if um is not None:
        kwargs.update(resolution=(1e4 / um, 1e4 / um), resolutionunit="CENTIMETER")
    import tifffile

    tifffile.imwrite(path, image, **kwargs)
    return path


def write_zarr(path: Path, data: np.ndarray, chunks: tuple[int, ...], axes: str = "cyx") -> Path:
    """A plain Zarr v3 array of ``data`` with named dimensions."""
    import zarr

    array = zarr.create_array(
        path, shape=data.shape, chunks=chunks, dtype=data.dtype, dimension_names=list(axes)
    )
    array[:] = data
    return path


def run_process(*args: object, env: dict | None = None, wait: bool = True, timeout: float = 180):
    """``pipeline ARGS...`` as a real process in its own process group (so a test can
    kill the driver and its local workers together, as ``kill -9 -PGID`` does).

    ``env`` is added to the environment (``PIPELINE_FAULTS``...). With ``wait`` the
    finished ``CompletedProcess`` (text output) is returned, else the ``Popen``.
    """
    from pipeline.testing import run_cli

    return run_cli(*args, env={"PYTHONPATH": str(ROOT), **(env or {})}, wait=wait, timeout=timeout)


def small_slide(path: Path, seed: int, shape=(150, 200)) -> Path:
    """A seeded random uint8 TIFF (32² zlib tiles) for :data:`SMALL_RUN` runs."""
    image = np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)
    return write_tiff(path, image, tile=(32, 32), compression="zlib")


def small_slides(folder: Path, names=("s1", "s2", "s3"), **kwargs) -> Path:
    """:func:`small_slide` ``folder/NAME.tif`` for each name, seeded by its position."""
    for seed, name in enumerate(names):
        small_slide(folder / f"{name}.tif", seed, **kwargs)
    return folder


def small_run(inputs, out, *extra, faults=None, env=None, sync=True):
    """``pipeline run`` with :data:`SMALL_RUN` as a real process: in-process blocks
    (``sync``) or 2 local workers; ``faults``: ``PIPELINE_FAULTS``."""
    env = {**(env or {}), **({"PIPELINE_FAULTS": faults} if faults else {})}
    where = ("--scheduler", "sync") if sync else ("--workers", "2")
    return run_process("run", inputs, "--out", out, *where, *SMALL_RUN, *extra, env=env)


def report_entries(out: Path) -> dict[str, dict]:
    """The entries of ``OUT/report.json``, by output name."""
    import json

    return {e["name"]: e for e in json.loads((out / "report.json").read_text())["inputs"]}


def image_files(out: Path) -> dict[str, dict[str, bytes]]:
    """Every file of every image in OUT, by image name and relative path: what must be
    bit-identical between two runs. The run settings recorded in each group's attributes
    (``pipeline.config``: workers, scheduler...) are left out of the comparison."""
    from pipeline import testing

    return testing.image_files(image_dirs(out))
