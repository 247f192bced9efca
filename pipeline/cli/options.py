"""The options of ``pipeline run``, each with its help text and its default, in one table.

Every option sets the :class:`~pipeline.config.RunConfig` field of the same name. The
help shows the field's default (``[default: 8]``), or how it is derived when the default
is "from the model or the image" (``[default: (256 + twice the valid margin...)]``).
Only options given on the command line override a ``--config`` file
(:func:`given_options`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import click
from click.core import ParameterSource

from pipeline.backends.tuning import CPU_BATCH
from pipeline.config import (
    BACKENDS,
    BLENDS,
    CLUSTERS,
    DTYPES,
    NGFF_VERSIONS,
    NORMALIZE,
    OBJECT_TYPES,
    ORT_PROVIDERS,
    PRECISIONS,
    TTA,
    RunConfig,
)

__all__ = ["RUN_EPILOG", "given_options", "run_options"]

_DEFAULTS = {f.name: f.default for f in dataclasses.fields(RunConfig)}
#: Shown as the default though the config's is None (decided per device): the CPU's.
_DEFAULTS["batch_size"] = CPU_BATCH

#: (flags, RunConfig field, click type, help, how a None default is derived)
_RUN: tuple[tuple[str, str, Any, str, str | None], ...] = (
    ("--tile", "tile", str,
     "Network input size in pixels: N, or Z,Y,X for a 3D model. It must be a size the model "
     "accepts (`pipeline inspect MODEL` lists them).",
     "256 in 2D, 64 in 3D, plus twice the valid margin, rounded to a size the model accepts"),
    ("--overlap", "overlap", int,
     "Overlap between neighbouring tiles' outputs, in pixels (tile positions are multiples "
     "of the model's size step, so it may come out a little larger).",
     "0 for valid models, tile/4 otherwise"),
    ("--blend", "blend", click.Choice(BLENDS),
     "How overlapping tile predictions are combined: gaussian (sigma = tile/8), cosine "
     "(ramp over the overlap), constant (plain average), crop (each pixel from the one tile "
     "that owns it); auto: crop for valid models, else gaussian.", None),
    ("--batch-size", "batch_size", int,
     "Tiles per forward pass (more uses more memory). Not given: 8 on a CPU; on a GPU as "
     "many as fill it (by pixels per batch and free memory).", None),
    ("--backend", "backend", click.Choice(BACKENDS),
     "Model runtime; auto: from the model file. identity writes the normalised input "
     "(tests, I/O benchmarks; no --model needed).", None),
    ("--device", "device", str,
     "Where the model runs: cpu, cuda, cuda:N; auto: the GPU when there is one. A GPU "
     "asked for that is missing is an error.", None),
    ("--precision", "precision", click.Choice(PRECISIONS),
     "Arithmetic of the model: fp32, or fp16/bf16 on a GPU (faster; TorchScript under "
     "autocast, ONNX through --ort-provider tensorrt).", None),
    ("--tta", "tta", click.Choice(TTA),
     "Test-time augmentation: flip averages the predictions over the axis flips (4 in 2D, "
     "8 in 3D), d4 over the 8 rotations and flips of square tiles; per tile before "
     "blending, so valid models stay exact (and it costs 4x or 8x the model's time).", None),
    ("--ort-provider", "ort_provider", click.Choice(ORT_PROVIDERS),
     "ONNX Runtime on a GPU: cuda, or tensorrt (opt-in: engines built on first use, fp16 "
     "with --precision fp16, cached in ~/.cache/pipeline/trt); auto: cuda.", None),
    ("--cuda-graphs/--no-cuda-graphs", "cuda_graphs", bool,
     "Replay a TorchScript network on a GPU as a CUDA graph (fewer kernel launches: "
     "helps small networks).", None),
    ("--dtype", "dtype", click.Choice(DTYPES),
     "Output values: uint8 (probability x 255, rounded), float16 or float32.", None),
    ("--ngff", "ngff", click.Choice(NGFF_VERSIONS),
     "OME-Zarr version written: 0.4 on Zarr v2 (QuPath, OMERO, Fiji, ilastik, napari open "
     "it) or 0.5 on Zarr v3 (napari, neuroglancer, vizarr); the README's viewer table says "
     "more.", None),
    ("--normalize", "normalize", click.Choice(NORMALIZE),
     "How integer input is scaled for the model: dtype (divided by the type's maximum) or "
     "none; auto: what the model file declares.", None),
    ("--threshold", "threshold", float,
     "Probability at which a one-class model's pixel counts as foreground (class labels, "
     "previews, polygons); several classes take the most probable one.", None),
    ("--class-names", "class_names", str,
     "Class names, comma-separated: the foreground classes (background is added), or all "
     "of them with background first. Shown as label and channel names in viewers.",
     "from the model file (`pipeline export --class-names`), else class 1, class 2..."),
    ("--geojson/--no-geojson", "geojson", bool,
     "Also write each image's objects as GeoJSON polygons for QuPath (drag the file onto "
     "the image): OUT/geojson/NAME.geojson, level-0 pixel coordinates, one feature per "
     "connected object and class, holes kept (2D images).", None),
    ("--simplify", "simplify", float,
     "GeoJSON: simplify outlines by this tolerance in pixels of the run's grid "
     "(Douglas-Peucker, topology kept); 0 keeps exact pixel outlines.", None),
    ("--object-type", "object_type", click.Choice(OBJECT_TYPES),
     "GeoJSON: QuPath object type of the polygons: annotation (editable regions) or "
     "detection (many small objects, drawn faster, counted).", None),
    ("--workers", "workers", int, "Worker processes of the local Dask cluster.",
     "one per GPU, else 1"),
    ("--threads-per-worker", "threads_per_worker", int,
     "Threads each worker gives the model.", "the cores divided among the workers"),
    ("--scheduler", "scheduler", str,
     "Address of a running Dask scheduler (tcp://host:8786), or sync to run in this process "
     "(debugging).", "a local cluster; in-process for a single block or one worker"),
    ("--cluster", "cluster", click.Choice(CLUSTERS),
     "Where blocks run: local (a Dask cluster here, or --scheduler) or slurm (workers as "
     "Slurm jobs through dask-jobqueue: jobqueue.yaml, DASK_JOBQUEUE__SLURM__*, and the "
     "config file's slurm: section).", None),
    ("--jobs", "jobs", int,
     "With --cluster slurm: Slurm jobs at most at once (adaptive from 0).", "1"),
    ("--chunk", "chunk", int, "Output chunk side in pixels (y and x).", "1024 in 2D, 128 in 3D"),
    ("--block", "block", int,
     "Block side in pixels, a multiple of --chunk: what one worker task computes.",
     "as large as --memory-budget-mb allows"),
    ("--memory-budget-mb", "memory_budget_mb", int,
     "Memory one block may use on a worker, in MB (sets the block size).", None),
    ("--pyramid-min", "pyramid_min", int,
     "The output pyramid stops when y and x fit this many pixels.", None),
    ("--in-channels", "in_channels", int,
     "Input channels of a model file without metadata.", "from the model file"),
    ("--classes", "classes", int,
     "Output channels (classes) of a model file without metadata.", "from the model file"),
    ("--series", "series", int, "Image series to read from a multi-image file.",
     "the main image"),
    ("--level", "level", int, "Input pyramid level to run on (0: full resolution).",
     "0, or the level --mpp picks"),
    ("--mpp", "mpp", float,
     "Run at this resolution, in micrometres per pixel: the pyramid level that matches, "
     "else the next finer level, area-resampled.",
     "the model's training resolution if it declares one, else level 0"),
    ("--mpp-input", "mpp_input", float,
     "Pixel size of the inputs' level 0 in micrometres, for files that have none (or a "
     "wrong one); it is written into the output and lets --mpp pick levels.",
     "from the file"),
    ("--channels", "channels", str,
     "Input channels fed to the model, in order, e.g. 0,1,2 (0,0,0 feeds a gray image to "
     "an RGB model).", "all, alpha dropped"),
    ("--mask", "mask", click.Path(exists=True, dir_okay=True),
     "A tissue mask image (PNG, TIFF or Zarr; nonzero is tissue) used for every input "
     "instead of tissue detection.", "detect tissue"),
    ("--extensions", "extensions", str,
     "File suffixes searched for in folders, comma-separated.", None),
)  # fmt: skip

RUN_EPILOG = """\b
Examples:
  pipeline run slides/ --out masks.zarr --model unet.onnx
  pipeline run a.svs b.ndpi --out masks.zarr --model unet.pt --device cuda --class-names tumor
  pipeline run slides.txt --out masks.zarr --model unet.onnx --mpp 0.5 --ngff 0.5
  pipeline run stack.tif --out em.zarr --model unet3d.onnx --tile 32,128,128 --dtype float32
  pipeline run slides/ --out masks.zarr --model unet.onnx --geojson --simplify 1
  pipeline run slides/ --out masks.zarr --model unet.onnx --config configs/default.yaml
  pipeline run big.tif --out copy.zarr --backend identity
  pipeline run slides/ --out masks.zarr --model unet.onnx --cluster slurm --jobs 8

\b
Exit codes: 0 all inputs done, up to date or skipped by design, 1 some input failed (the
others ran; see OUT/report.json), 2 a usage error (nothing ran, OUT not created), OUT
locked by another run, or an unwritable OUT (nothing finished), 130 interrupted (rerun the
same command to continue).
"""


def _shown(key: str, derived: str | None) -> str | bool:
    default = _DEFAULTS[key]
    if default is None:
        return derived or "none"
    return True


def run_options(command: Callable) -> Callable:
    """Decorate ``command`` with every option of :data:`_RUN` (plus the tissue switch)."""
    command = click.option(
        "--skip-background/--no-skip-background",
        default=_DEFAULTS["skip_background"],
        show_default=True,
        help="Detect tissue on 2D images and skip tiles without any (output 0 there; "
        "identical to a full run inside tissue).",
    )(command)
    for flags, key, kind, text, derived in reversed(_RUN):
        default = _DEFAULTS[key]
        if isinstance(default, tuple):
            default = ",".join(map(str, default))
        command = click.option(
            flags,
            key,
            type=kind,
            default=default,
            show_default=_shown(key, derived),
            help=text,
        )(command)
    return command


def given_options(ctx: click.Context, options: Mapping[str, Any]) -> dict[str, Any]:
    """The options given on the command line (defaults must not override ``--config``)."""
    return {
        k: v
        for k, v in options.items()
        if ctx.get_parameter_source(k) not in (ParameterSource.DEFAULT, None)
    }
