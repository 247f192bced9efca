#!/usr/bin/env bash
# Fetch (here, where PyPI is reachable) the wheels a lent GPU machine lacks, into .whl/ at
# the repository root, for benchmarks/gpu_check.sh to install there offline.
#
#     bash benchmarks/gpu_wheels.sh [DIR]      (default: .whl; about 40 MB)
#
# The `nvidia-h200` machines (see the device tool's KINDS.md) run Python 3.12 with torch,
# numpy, scipy, tifffile, onnx, onnxruntime (CPU), psutil, pyyaml, click, pytest...; they
# lack zarr, dask/distributed, imagecodecs (JPEG in TIFF) and MONAI. The versions are the
# ones the project is tested with; --no-deps, so every missing dependency is named here.
# The folder is added to .git/info/exclude: it travels with a device run only when the
# run names it in `carry`.
set -euo pipefail
cd "$(dirname "$0")/.."
DIR=${1:-.whl}
mkdir -p "$DIR"
if [[ $DIR != /* ]] && git rev-parse --git-dir >/dev/null 2>&1; then
    exclude="$(git rev-parse --git-common-dir)/info/exclude"
    mkdir -p "$(dirname "$exclude")"
    grep -qxF "/$DIR/" "$exclude" 2>/dev/null || echo "/$DIR/" >>"$exclude"
fi
PLATFORMS=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 \
    manylinux2014_x86_64 manylinux_2_5_x86_64 manylinux1_x86_64; do
    PLATFORMS+=(--platform "$p")
done
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp "${PLATFORMS[@]}" -d "$DIR" \
    zarr==3.1.6 numcodecs==0.16.6 google-crc32c==1.9.0 donfig==0.8.1.post1 \
    dask==2026.8.0 distributed==2026.8.0 tblib==3.2.2 zict==3.0.0 locket==1.0.0 \
    partd==1.4.2 tornado==6.6.1 imagecodecs==2026.3.6 tifffile==2026.3.3 monai==1.6.1
ls -la "$DIR"
du -sh "$DIR"
