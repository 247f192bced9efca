"""Per-GPU throughput: the pipeline end to end against the network alone and MONAI.

    python benchmarks/bench_gpu.py [--model b64,b32,3d32] [--device auto|cuda|cpu]
        [--size 8192] [--volume 128,512,512] [--batch-size N] [--precision bf16]
        [--inputs 1] [--no-peer] [--budget-s 600] [--tiny] [--workdir DIR]
        [--out benchmarks/results/history.jsonl]

One line in the history per model (U-Net depth 4, ``same`` padding, 1 class, seeded
weights with non-trivial BatchNorm statistics, exported to TorchScript):

``b64``   2D, base 64, RGB, tile 512, overlap 64, on a slide-like JPEG TIFF (``--size``²)
``b32``   2D, base 32, the same slide and tiles
``3d32``  3D, base 32, 1 channel, tile 128³, overlap 32, on a synthetic Zarr volume

Figures, Mpix/s (Mvox/s) of image pixels:

``e2e``         ``pipeline.run.run`` in a child process (TorchScript, ``--device``,
                ``--precision``, no tissue skipping, OME-Zarr out, the default layout) on
                a warm-up input (a quarter of each side: it pays for the cluster's start,
                the model's load and cuDNN's tuning) then ``--inputs`` copies of the
                input: ``e2e`` the fastest copy's per-input seconds (steady state: the
                figure), ``e2e_with_startup`` the whole call's wall time per copy.
``network``     the network alone on the same number of tiles, batches made beforehand:
                ``net_backend`` ``load_backend(...).predict`` on device tensors when it
                takes them (else on host arrays: ``net_backend_host``), ``net_module``
                the model file's TorchScript module on device tensors under autocast;
                ``network_only`` is the fastest of these, timed with
                ``torch.cuda.synchronize``.
``monai``       MONAI ``sliding_window_inference`` (gaussian, same tile, overlap and batch)
                with autocast at ``--precision`` on the same weights in eager torch: read
                the input, infer, write a Zarr. Cold and warm (second) run.

Ratios: ``e2e / network_only`` (goal ≥ 0.8) and ``e2e / monai``. Goal for b64 in bf16
on one GPU: ``e2e`` ≥ 300 Mpix/s. ``--tiny``: the same code paths on tiny images and
narrow networks (a CPU smoke run of seconds; ``gpu_check.sh`` uses it without a GPU).
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (  # noqa: E402
    DEFAULT_HISTORY,
    append_history,
    fmt,
    gpu_info,
    run_process,
    use_source_tree,
    work_folder,
)
from _gpu import (  # noqa: E402
    CLASSES,
    DEPTH,
    build_model,
    copies,
    lattice_tiles,
    make_input,
    monai_peer,
    network_only,
    warmup_shape,
)

MODELS: dict[str, dict[str, Any]] = {
    "b64": {"ndim": 2, "base": 64, "channels": 3, "tile": 512, "overlap": 64},
    "b32": {"ndim": 2, "base": 32, "channels": 3, "tile": 512, "overlap": 64},
    "3d32": {"ndim": 3, "base": 32, "channels": 1, "tile": 128, "overlap": 32},
}
# --tiny: the same models, narrow, on tiny images (seconds on a CPU)
TINY: dict[str, dict[str, Any]] = {
    "b64": {"base": 4, "tile": 64, "overlap": 16},
    "b32": {"base": 2, "tile": 64, "overlap": 16},
    "3d32": {"base": 2, "tile": 32, "overlap": 16},
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="b64,b32,3d32", help="comma list of " + ", ".join(MODELS))
    p.add_argument("--device", default="auto", help="auto, cuda, cuda:N or cpu")
    p.add_argument("--size", type=int, default=8192, help="2D slide side in pixels")
    p.add_argument("--volume", default="128,512,512", help="3D volume Z,Y,X")
    p.add_argument("--batch-size", type=int, help="tiles per batch (default: the pipeline's)")
    p.add_argument("--precision", help="fp32, fp16, bf16 (default: bf16 on CUDA, fp32 on CPU)")
    p.add_argument(
        "--inputs", type=int, default=1, help="copies of the input run after the warm-up one"
    )
    p.add_argument("--no-peer", action="store_true", help="skip MONAI")
    p.add_argument("--budget-s", type=float, default=600, help="stop starting work after this")
    p.add_argument("--tiny", action="store_true", help="tiny images and narrow networks")
    p.add_argument("--workdir", help="keep inputs and models here (default: temp)")
    p.add_argument("--out", default=str(DEFAULT_HISTORY), help="history file (JSON lines)")
    args = p.parse_args(argv)
    args.models = [m.strip() for m in args.model.split(",") if m.strip()]
    for m in args.models:
        if m not in MODELS:
            p.error(f"unknown model {m!r}: use {', '.join(MODELS)}")
    args.volume = tuple(int(v) for v in args.volume.split(","))
    if args.tiny:
        args.size, args.volume = min(args.size, 192), tuple(min(v, 48) for v in args.volume)
        args.volume = (min(args.volume[0], 32), *args.volume[1:])
    if args.inputs < 1:
        p.error("--inputs must be at least 1")
    return args


def model_params(name: str, tiny: bool) -> dict[str, Any]:
    return {**MODELS[name], **(TINY[name] if tiny else {})}


def child_e2e(model: str, out: str, cfg_json: str, *inputs: str) -> dict[str, Any]:
    """``pipeline.run.run`` over ``inputs`` (run in its own process by the driver)."""
    from pipeline.config import RunConfig
    from pipeline.run import run

    cfg = RunConfig(**json.loads(cfg_json))
    t0 = time.perf_counter()
    report = run(list(inputs), out, model, cfg)
    wall = time.perf_counter() - t0
    bad = [f"{r.name}: {r.reason}: {r.message}" for r in report.inputs if r.state != "done"]
    if bad:
        raise RuntimeError("pipeline run failed: " + "; ".join(bad))
    keys = ("seconds", "tiles", "blocks", "pixels")
    return {"wall_s": wall, "inputs": [{k: getattr(r, k) for k in keys} for r in report.inputs]}


def end_to_end(args, mp, model: Path, inputs: list[Path], work: Path, timeout: float) -> dict:
    cfg = {
        "tile": [mp["tile"]],
        "overlap": mp["overlap"],
        "backend": "torchscript",
        "device": args.device,
        "precision": args.precision,
        "skip_background": False,
    }
    if args.batch_size:
        cfg["batch_size"] = args.batch_size
    if args.tiny:  # in-process: a local cluster's start would be most of a tiny run
        cfg["scheduler"] = "sync"
    out = work / "out.zarr"
    shutil.rmtree(out, ignore_errors=True)
    cmd = [sys.executable, str(Path(__file__).resolve()), "_child", str(model), str(out)]
    cmd += [json.dumps(cfg), *map(str, inputs)]
    try:
        proc = run_process(cmd, timeout)
    finally:
        shutil.rmtree(out, ignore_errors=True)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stdout[-1500:] + proc.stderr[-1500:]).strip()
        raise RuntimeError(f"end-to-end child exited {proc.returncode}: {tail}")
    return {**json.loads(lines[-1][len("RESULT ") :]), "config": cfg}


# ---------------------------------------------------------------------------- main


def bench_model(args, name: str, work: Path, deadline: float) -> dict[str, Any]:
    """Every figure of one model; each failure (or the budget) recorded, not raised.

    End to end first (the figure that matters, and the slowest while the host path is
    slow), leaving ``reserve`` seconds of the budget for the network alone and MONAI.
    """
    from pipeline.config import RunConfig

    mp = model_params(name, args.tiny)
    # the network alone runs the batches the pipeline would; 8 if its default ever
    # becomes "chosen at run time" (then pass --batch-size to compare like with like)
    batch = args.batch_size or RunConfig().batch_size or 8
    shape = (args.size, args.size) if mp["ndim"] == 2 else tuple(args.volume)
    figures: dict[str, Any] = {}
    errors: dict[str, str] = {}
    t0 = time.perf_counter()
    src = make_input(mp, shape, work)
    warm = make_input(mp, warmup_shape(mp, shape), work)
    figures["input_s"] = round(time.perf_counter() - t0, 3)
    model, weights, figures["export_s"] = build_model(mp, work)
    tiles = lattice_tiles(shape, mp)
    print(f"  {name} input {figures['input_s']:.1f} s, export {figures['export_s']:.1f} s")
    reserve = 10 if args.tiny else 40
    steps = [
        (
            "e2e",
            lambda: e2e_step(
                args, mp, model, [warm] + [src] * args.inputs, work, deadline - reserve
            ),
        ),
        ("network", lambda: network_only(args, mp, model, tiles, batch)),
    ]
    if not args.no_peer:
        steps.append(("monai", lambda: monai_peer(args, mp, src, weights, work, batch)))
    for key, step in steps:
        t1 = time.perf_counter()
        if deadline - t1 < 5:
            errors[key] = "skipped: out of --budget-s"
            continue
        try:
            figures[key] = step()
        except ImportError as exc:
            errors[key] = f"skipped: {exc}"
        except subprocess.TimeoutExpired as exc:
            errors[key] = f"timed out after {exc.timeout:.0f} s (--budget-s)"
        except Exception as exc:  # one failing figure must not hide the others
            errors[key] = f"{type(exc).__name__}: {exc}"[:3000]
        _release(args.device)
        print(f"  {name} {key}: {time.perf_counter() - t1:.1f} s", flush=True)
    figures["lattice_tiles"] = tiles  # what the network-only loop runs
    ran = [i["tiles"] for i in figures.get("e2e", {}).get("inputs", [])[1:]]
    if any(t != tiles for t in ran):
        errors["tiles"] = f"the pipeline ran {ran} tiles per input, the lattice has {tiles}"
    pixels = math.prod(shape)
    return {
        "model": name,
        "params": {**mp, "depth": DEPTH, "classes": CLASSES, "padding": "same", "batch": batch},
        "shape": list(shape),
        "pixels": pixels,
        "mpix_per_s": rates(figures, pixels),
        "figures": figures,
        "errors": errors,
    }


def e2e_step(args, mp, model: Path, sources: list[Path], work: Path, until: float) -> dict:
    """End to end on copies of ``sources`` (the warm-up input first), stopped at ``until``."""
    run_dir = work / "run"
    try:
        inputs = copies(sources, run_dir)
        return end_to_end(args, mp, model, inputs, work, max(5.0, until - time.perf_counter()))
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)


def _release(device: str) -> None:
    gc.collect()
    if device.startswith("cuda"):
        import torch

        torch.cuda.empty_cache()


def rates(f: dict, pixels: int) -> dict[str, float | None]:
    def mpix(seconds: float | None) -> float | None:
        return round(pixels / 1e6 / seconds, 3) if seconds else None

    net, e2e, peer = f.get("network", {}), f.get("e2e", {}), f.get("monai", {})
    later = [i["seconds"] for i in e2e.get("inputs", [])[1:]]  # after the warm-up input
    r = {
        "e2e": mpix(min(later)) if later else None,
        # the whole ``run`` call (cluster start, model load, warm-up input) per full input
        "e2e_with_startup": mpix(e2e["wall_s"] / len(later)) if later else None,
        "net_backend": mpix(net.get("net_backend_s")),
        "net_backend_host": mpix(net.get("net_backend_host_s")),
        "net_module": mpix(net.get("net_module_s")),
        "monai": mpix(peer.get("warm_s")),
        "monai_cold": mpix(peer.get("cold_s")),
    }
    nets = [v for k, v in r.items() if k.startswith("net_") and v]
    r["network_only"] = max(nets) if nets else None

    def ratio(a: str, b: str) -> float | None:
        return round(r[a] / r[b], 4) if r[a] and r[b] else None

    r.update(
        ratio_e2e_network=ratio("e2e", "network_only"),
        ratio_e2e_with_startup_network=ratio("e2e_with_startup", "network_only"),
        ratio_e2e_monai=ratio("e2e", "monai"),
    )
    return r


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    use_source_tree()
    if argv and argv[0] == "_child":
        print("RESULT " + json.dumps(child_e2e(*argv[1:])), flush=True)
        return 0
    if argv and argv[0] == "_summary":
        return summarise_check(*argv[1:])
    args = parse_args(argv)
    start = time.perf_counter()
    # a `timeout` around this script sends TERM: unwind, so the end-to-end child and
    # its cluster are killed (run_process) rather than left holding the GPU
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    from pipeline.backends import resolve_device
    from pipeline.errors import PipelineError

    try:
        args.device = resolve_device(args.device)
    except PipelineError as exc:
        print(f"bench_gpu: {exc}", file=sys.stderr)
        return 2
    cuda = args.device.startswith("cuda")
    args.precision = args.precision or ("bf16" if cuda else "fp32")
    env = gpu_info()
    print(f"device {args.device} ({env.get('gpu', 'no GPU')}), precision {args.precision}")
    if not cuda and not args.tiny:
        print(
            "  note: no CUDA device; this is a CPU run at full size (slow). --tiny is the smoke run"
        )
    work, tmp = work_folder(args.workdir, "bench_gpu_")
    failed = False
    try:
        for name in args.models:
            t0 = time.perf_counter()
            res = bench_model(args, name, work, start + args.budget_s)
            record = append_history(
                args.out,
                {
                    "benchmark": "gpu",
                    **res,
                    "params": {
                        **res["params"],
                        "device": args.device,
                        "precision": args.precision,
                        "inputs": args.inputs,
                        "tiny": args.tiny,
                        "peer": not args.no_peer,
                    },
                    "gpu_env": env,
                    "seconds": round(time.perf_counter() - t0, 1),
                },
            )
            report(record)
            failed |= any(not e.startswith("skipped: ") for e in res["errors"].values())
    finally:
        if tmp is not None:
            tmp.cleanup()
    return 1 if failed else 0


GOALS = {"b64_e2e_mpix_s": 300, "ratio_e2e_network": 0.8}


def summarise_check(out: str, steps_tsv: str, mode: str, budget: str, total: str) -> int:
    """``gpu_check.sh``'s last step: OUTDIR/gpu_check.json from the steps it ran, the
    JUnit file of the GPU tests and the history lines of the benchmark; 0 when all ran."""
    import xml.etree.ElementTree as ET

    folder = Path(out)
    steps = {}
    for line in Path(steps_tsv).read_text().splitlines():
        name, rc, secs, limit = line.split("\t")
        steps[name] = {"rc": int(rc), "seconds": float(secs), "limit_s": int(limit)}
    tests: dict[str, Any] = {}
    junit = folder / "pytest_gpu.xml"
    if junit.exists():
        root = ET.parse(junit).getroot()
        suite = root if root.tag == "testsuite" else root.find("testsuite")
        if suite is not None:
            tests = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
            tests["passed"] = (
                tests["tests"] - tests["failures"] - tests["errors"] - tests["skipped"]
            )
    history = folder / "history.jsonl"
    records = (
        [json.loads(ln) for ln in history.read_text().splitlines()] if history.exists() else []
    )
    models = {
        r["model"]: {k: r.get(k) for k in ("mpix_per_s", "errors", "params", "shape", "seconds")}
        for r in records
        if r.get("benchmark") == "gpu"
    }
    b64 = models.get("b64", {}).get("mpix_per_s") or {}
    summary = {
        "check": "gpu_check",
        "mode": mode,
        "ok": bool(steps)
        and all(s["rc"] == 0 for s in steps.values())
        and not tests.get("failures")
        and not tests.get("errors")
        and bool(models),
        "total_s": int(total),
        "budget_s": int(budget),
        "steps": steps,
        "tests": tests,
        "gpu_env": records[0].get("gpu_env") if records else gpu_info(),
        "commit": records[0].get("commit") if records else None,
        "models": models,
        "headline": {
            "b64_e2e_mpix_s": b64.get("e2e"),
            "b64_network_only_mpix_s": b64.get("network_only"),
            "b64_ratio_e2e_network": b64.get("ratio_e2e_network"),
            "b64_monai_mpix_s": b64.get("monai"),
            "goals": GOALS,
        },
    }
    (folder / "gpu_check.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
    print(
        f"\ngpu_check ({mode}): {'ok' if summary['ok'] else 'NOT ok'} in {total} s; tests {tests}"
    )
    for name, step in steps.items():
        print(
            f"  {name:<12} exit {step['rc']:>4}  {step['seconds']:>7.1f} s (limit {step['limit_s']} s)"
        )
    for name, m in models.items():
        r = m["mpix_per_s"]
        print(
            f"  {name:<5} e2e {fmt(r['e2e'])}  network {fmt(r['network_only'])}  ratio "
            f"{fmt(r['ratio_e2e_network'])}  MONAI {fmt(r['monai'])} Mpix/s"
        )
    print(f"  results: {folder / 'gpu_check.json'}")
    return 0 if summary["ok"] else 1


def report(rec: dict) -> None:
    r, p, f = rec["mpix_per_s"], rec["params"], rec["figures"]
    runs = f.get("e2e", {}).get("inputs", [])
    full = runs[-1] if len(runs) > 1 else {}
    print(
        f"{rec['model']}: {p['ndim']}D base {p['base']}, tile {p['tile']}, overlap "
        f"{p['overlap']}, batch {p['batch']}, {p['precision']} on {p['device']}, image "
        f"{' x '.join(map(str, rec['shape']))} ({full.get('blocks')} blocks, "
        f"{full.get('tiles')} tiles), {rec['seconds']} s"
    )
    first = f"{runs[0]['seconds']:.1f} s" if runs else "n/a"
    print(
        f"  end to end     {fmt(r['e2e'])} Mpix/s (steady)   whole call "
        f"{fmt(r['e2e_with_startup'])} (warm-up input {first})"
    )
    print(
        f"  network only   {fmt(r['network_only'])} Mpix/s   (backend on device "
        f"{fmt(r['net_backend'])}, backend from host {fmt(r['net_backend_host'])}, "
        f"module {fmt(r['net_module'])})"
    )
    print(f"  MONAI + AMP    {fmt(r['monai'])} Mpix/s   cold {fmt(r['monai_cold'])}")
    print(
        f"  e2e / network  {fmt(r['ratio_e2e_network'])} (goal >= 0.8)   e2e / MONAI "
        f"{fmt(r['ratio_e2e_monai'])}"
    )
    for key, err in rec["errors"].items():
        print(f"  {key}: {err.splitlines()[0][:300] if err else err}")


if __name__ == "__main__":
    sys.exit(main())
