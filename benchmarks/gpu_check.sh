#!/usr/bin/env bash
# The GPU check in one go: the GPU tests, then the GPU benchmark; results in OUTDIR.
#
#     bash benchmarks/gpu_check.sh OUTDIR
#
# With a CUDA device (torch sees one): `pytest -m gpu`, then benchmarks/bench_gpu.py for
# b64, b32 and 3d32, one process each under a hard `timeout`, in under 8 minutes on an
# H200 (GPU_CHECK_BUDGET, default 450 s, caps every step). Without one: the same steps,
# tiny (bench_gpu.py --tiny on the CPU), in well under a minute; CI runs that.
#
# OUTDIR receives (4 files):
#   gpu_check.json  summary: mode, every step's exit code and seconds, test counts, the GPU,
#                   driver and versions, each model's Mpix/s and ratios, ok
#   history.jsonl   one line per model, as benchmarks/results/history.jsonl takes them
#   gpu_check.log   everything printed
#   pytest_gpu.xml  the GPU tests (JUnit)
#
# Packages the machine lacks: wheels in .whl/ at the repository root (benchmarks/gpu_wheels.sh
# fetches them) are installed first, offline, into a temporary folder; the project itself
# runs from this tree (PYTHONPATH), nothing is built.
# Environment: PYTHON (python3), GPU_CHECK_MODE (gpu|cpu, default: what torch sees),
# GPU_CHECK_BUDGET (seconds, 450), GPU_CHECK_SIZE (2D slide side, 8192),
# GPU_CHECK_VOLUME (3D volume Z,Y,X, 128,512,512), GPU_CHECK_MODELS (b64,b32,3d32).
set -uo pipefail

if [ $# -ne 1 ]; then
    echo "usage: bash benchmarks/gpu_check.sh OUTDIR" >&2
    exit 2
fi
mkdir -p "$1" || exit 2
OUT=$(cd "$1" && pwd)
cd "$(dirname "$0")/.." || exit 2
ROOT=$(pwd)
PY=${PYTHON:-python3}
BUDGET=${GPU_CHECK_BUDGET:-450}
START=$(date +%s)
SCRATCH=$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")
STEPS=$SCRATCH/steps.tsv
: >"$STEPS"
: >"$OUT/history.jsonl"
trap 'rm -rf "$SCRATCH"' EXIT
exec > >(tee "$OUT/gpu_check.log") 2>&1
TEE=$!

# step NAME LIMIT CMD...: runs CMD under `timeout`, never past the budget; records
# name, exit code, seconds and limit (124/137: killed at the limit; -1: not started)
step() {
    local name=$1 limit=$2
    shift 2
    local left=$((START + BUDGET - $(date +%s)))
    if [ "$left" -lt 15 ]; then
        echo "== $name: not started, the ${BUDGET} s budget is spent"
        printf '%s\t-1\t0\t0\n' "$name" >>"$STEPS"
        return
    fi
    [ "$limit" -gt "$left" ] && limit=$left
    echo "== [$(date +%T)] $name (limit ${limit} s): $*"
    local t0 rc
    t0=$(date +%s.%N)
    timeout -k 15 "$limit" "$@"
    rc=$?
    local secs
    secs=$(awk -v a="$t0" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }')
    echo "== $name: exit $rc after $secs s (elapsed $(($(date +%s) - START)) s of $BUDGET)"
    printf '%s\t%s\t%s\t%s\n' "$name" "$rc" "$secs" "$limit" >>"$STEPS"
}

if compgen -G "$ROOT/.whl/*.whl" >/dev/null; then
    step install 90 "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
        --upgrade --target "$SCRATCH/site" "$ROOT"/.whl/*.whl
    export PYTHONPATH="$SCRATCH/site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1

MODE=${GPU_CHECK_MODE:-}
if [ -z "$MODE" ]; then
    if "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
        MODE=gpu
    else
        MODE=cpu
    fi
fi
echo "== gpu_check: mode $MODE, budget $BUDGET s, output $OUT, python $("$PY" -c 'import sys; print(sys.executable)')"
if [ "$MODE" = gpu ]; then
    # informative only: a machine without nvidia-smi still runs the check
    step env 30 bash -c 'nvidia-smi || echo "nvidia-smi: not available"; exit 0'
    BENCH_ARGS=(--device cuda --size "${GPU_CHECK_SIZE:-8192}" --volume "${GPU_CHECK_VOLUME:-128,512,512}")
    LIMITS=(b64:150 b32:90 3d32:80)
else
    BENCH_ARGS=(--device cpu --tiny)
    LIMITS=(b64:60 b32:60 3d32:60)
fi

step tests 100 "$PY" -m pytest -q -m gpu tests/test_gpu.py -p no:cacheprovider \
    --junitxml="$OUT/pytest_gpu.xml"

WORK=$SCRATCH/work
MODELS=",${GPU_CHECK_MODELS:-b64,b32,3d32},"
for entry in "${LIMITS[@]}"; do
    model=${entry%%:*}
    limit=${entry##*:}
    case $MODELS in *",$model,"*) ;; *) continue ;; esac
    left=$((START + BUDGET - $(date +%s)))
    [ "$limit" -gt "$left" ] && limit=$left
    # the benchmark stops starting work 20 s before the hard limit, and records why
    step "bench_$model" "$limit" "$PY" benchmarks/bench_gpu.py --model "$model" \
        "${BENCH_ARGS[@]}" --budget-s $((limit > 40 ? limit - 20 : limit / 2)) \
        --workdir "$WORK" --out "$OUT/history.jsonl"
done

"$PY" benchmarks/bench_gpu.py _summary "$OUT" "$STEPS" "$MODE" "$BUDGET" \
    "$(($(date +%s) - START))"
rc=$?
exec >&- 2>&-
wait "$TEE" 2>/dev/null # the log is complete when this script returns
exit "$rc"
