"""Helpers shared by the test suite and the benchmarks (a run never uses them).

Both compare outputs of separate runs file by file and build seeded U-Nets; keeping
that here means a test and the benchmark that times the same thing check it the same
way.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any


def run_cli(
    *args: object,
    env: dict | None = None,
    wait: bool = True,
    timeout: float | None = None,
    stdout: int = subprocess.PIPE,
) -> subprocess.CompletedProcess | subprocess.Popen:
    """``pipeline ARGS...`` as a real process in its own process group (so the driver
    and its local workers can be killed together, as ``kill -9 -PGID`` does).

    ``env`` is added to the environment. With ``wait`` the finished
    ``CompletedProcess`` (text output) is returned, else the ``Popen`` (its standard
    output to ``stdout``).
    """
    command = [sys.executable, "-m", "pipeline.cli", *map(str, args)]
    options = {
        "env": {**os.environ, **(env or {})},
        "start_new_session": True,
        "stderr": subprocess.PIPE,
        "text": True,
    }
    if not wait:
        return subprocess.Popen(command, stdout=stdout, **options)
    return subprocess.run(command, stdout=subprocess.PIPE, timeout=timeout, **options)


def image_files(images: Iterable[Path]) -> dict[str, dict[str, bytes]]:
    """Every file of every image folder, by image name and relative path: what must be
    bit-identical between two runs.

    The run settings each image records in its attributes (``pipeline.config``:
    workers, scheduler...) are left out, so runs that differ only in where blocks ran
    compare equal.
    """
    result = {}
    for image in images:
        files = {}
        for path in sorted(p for p in image.rglob("*") if p.is_file()):
            data = path.read_bytes()
            if path.name in ("zarr.json", ".zattrs"):  # NGFF 0.5 or 0.4 attributes
                meta = json.loads(data)
                attrs = meta.get("attributes", {}) if path.name == "zarr.json" else meta
                if isinstance(attrs.get("pipeline"), dict):
                    attrs["pipeline"].pop("config", None)
                data = json.dumps(meta, sort_keys=True).encode()
            files[str(path.relative_to(image))] = data
        result[image.name] = files
    return result


def seeded_weights(path: str | os.PathLike, *, spread: float = 0.1, **arch: Any) -> Path:
    """Save the state dict of a seeded ``pipeline.model.UNet(**arch)`` whose BatchNorm
    layers have non-trivial statistics (so folding them at export is exercised): running
    means uniform in ``±spread``, running variances in 0.5..1.5."""
    import torch

    from pipeline.model import UNet

    torch.manual_seed(0)
    net = UNet(**arch)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                m.running_mean.uniform_(-spread, spread)
                m.running_var.uniform_(0.5, 1.5)
    torch.save(net.state_dict(), path)
    return Path(path)
