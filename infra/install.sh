#!/usr/bin/env bash
# Create ./.venv and install mar3d with everything it needs (idempotent).
#
# torch/torchvision are pinned first: open_clip and timm import torchvision, and the only
# torchvision wheels that import beside a CPU torch on these machines are the pair below
# (plain `pip install torch` would otherwise resolve a different multi-GB CUDA build).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
TORCH_SPEC=${MAR3D_TORCH_SPEC:-"torch==2.14.1 torchvision==0.29.1"}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
. .venv/bin/activate
# The pages tests drive a real browser: Debian's Chromium (Playwright uses it and downloads
# none). Installed beside the pip installs below, as root on Debian only; elsewhere those
# tests say how to point them at a Chromium (MAR3D_CHROMIUM).
browser=""
if ! command -v chromium >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
  ( export DEBIAN_FRONTEND=noninteractive
    apt-get install -y -q chromium >/tmp/mar3d-chromium-install.log 2>&1 \
    || { apt-get update -q && apt-get install -y -q chromium; } >>/tmp/mar3d-chromium-install.log 2>&1 ) &
  browser=$!
fi
# shellcheck disable=SC2086
python -m pip install -q $TORCH_SPEC 2>&1 | { grep -v "^WARNING: Location" || true; }
# The lock as constraints: a fresh machine gets the versions the tests passed with, not
# whatever was released since (new boto3/httpx releases once broke the lock test and
# shifted float results of a fresh install). Test-only tools are not in the lock.
python -m pip install -q -c infra/requirements.lock -e ".[test]" 2>&1 | { grep -v "^WARNING: Location" || true; }
if [ -n "$browser" ] && ! wait "$browser"; then
  echo "installing Chromium failed (see /tmp/mar3d-chromium-install.log)" >&2
  exit 1
fi
python -c "import torch, torchvision, ray, deepspeed, mlflow, kfp, open_clip, timm, trimesh, igl, embreex, fpsample, mar3d; print('mar3d', mar3d.__version__, 'torch', torch.__version__, 'ray', ray.__version__)"
