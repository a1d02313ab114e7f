#!/usr/bin/env bash
# Packs what benchmarks/gpu_figures.py needs on the GPU device machine and the device
# image lacks (benchmarks/gpu_bundle.txt) into .gpu/site.tar.xz (git-ignored), to be
# named in the device run's `carry`. The device has no network and runs Python 3.12, so
# the packages travel as cp312 manylinux files, unpacked here and re-packed with xz: the
# wheels alone (ray's is 79 MB) are over the 64 MiB a device call may carry.
#
#   bash benchmarks/gpu_bundle.sh          # ~5 min on 2 cores; prints the bundle's size
#
# Then, on the device (README, "GPU figures"):
#   mkdir -p /tmp/site && tar -xJf .gpu/site.tar.xz -C /tmp/site && export PYTHONPATH=/tmp/site:$PWD
#
# DeepSpeed publishes only a source archive: it is built here into a pure-Python wheel
# (DS_BUILD_OPS=0: no ops compiled; on the GPU DeepSpeed needs none of its own for ZeRO-2
# with the torch AdamW of mar3d.train.optim). Pruned, as never imported by the
# benchmark: ray's Java jars, dashboard web client and ray.llm; mlflow's web UI; the
# static libraries, CMake files and C++ headers that libigl/embree wheels ship.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
CACHE=${MAR3D_GPU_CACHE:-/tmp/mar3d-gpu-bundle}
LIMIT_MIB=60  # leaves the repository itself room under the device's 64 MiB
mkdir -p "$CACHE/wheels" "$CACHE/sdist" .gpu
rm -rf "$CACHE/stage" && mkdir -p "$CACHE/stage"

platforms=""
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64 manylinux_2_17_x86_64 \
         manylinux2014_x86_64 manylinux1_x86_64; do
  platforms="$platforms --platform $p"
done
grep -v '^#' benchmarks/gpu_bundle.txt | grep -v '^deepspeed==' | grep . > "$CACHE/wanted.txt"
# shellcheck disable=SC2086
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  $platforms -d "$CACHE/wheels" -r "$CACHE/wanted.txt"

ds=$(grep '^deepspeed==' benchmarks/gpu_bundle.txt)
"$PY" -m pip download -q --no-deps --no-binary=:all: -d "$CACHE/sdist" "$ds"
# --no-build-isolation: DeepSpeed's setup.py imports torch, which the local env has.
DS_BUILD_OPS=0 "$PY" -m pip wheel -q --no-deps --no-build-isolation -w "$CACHE/wheels" \
  "$CACHE/sdist/deepspeed-${ds#deepspeed==}.tar.gz"

for w in "$CACHE"/wheels/*.whl; do unzip -q -o "$w" -d "$CACHE/stage"; done
(cd "$CACHE/stage" && rm -rf ray/jars ray/dashboard/client/build ray/llm mlflow/server/js \
  include share lib64 && find . -name '__pycache__' -prune -exec rm -rf {} +)
tar -C "$CACHE/stage" -cf - . | xz -T2 -6 > .gpu/site.tar.xz
size=$(stat -c %s .gpu/site.tar.xz)
echo ".gpu/site.tar.xz: $((size / 1048576)) MiB ($(ls "$CACHE"/wheels/*.whl | wc -l) packages)"
if [ "$size" -gt $((LIMIT_MIB * 1048576)) ]; then
  echo "over ${LIMIT_MIB} MiB: the device call would not carry it with the repository" >&2
  exit 1
fi
