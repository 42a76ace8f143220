#!/usr/bin/env bash
# Create bench/.anomalib-venv with anomalib 2.7.0, for the side-by-side PatchCore benchmark
# (bench/patchcore_perf.py runs anomalib in a subprocess with this interpreter when it exists).
#
# anomalib is never a dependency of iadkit: it lives in its own virtual environment, which
# .gitignore excludes. It needs ~6 GB of disk and several minutes (torch is installed from
# this machine's wheel cache; anomalib pulls lightning, torchmetrics, timm, kornia, FrEIA,
# open-clip-torch, ...). Nothing is downloaded at benchmark time: anomalib runs with
# pre_trained=False and gets the EfficientNet-Lite0 weights from iadkit's packaged file.
#
# Usage: bash bench/anomalib_env.sh            (PYTHON=python3.11 to choose the interpreter)
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
venv="$here/.anomalib-venv"
python="${PYTHON:-python3}"

if [ ! -x "$venv/bin/python" ]; then
    "$python" -m venv "$venv"
fi
pip=("$venv/bin/python" -m pip install -q --disable-pip-version-check)
"${pip[@]}" --upgrade pip
# The same torch as iadkit's environment, so both sides run the same kernels.
"${pip[@]}" torch==2.14.1 torchvision==0.29.1
"${pip[@]}" "anomalib==2.7.0"
"$venv/bin/python" - <<'PY'
import anomalib, timm, torch
from anomalib.models.image.patchcore.torch_model import PatchcoreModel  # noqa: F401
print(f"anomalib {anomalib.__version__}, torch {torch.__version__}, timm {timm.__version__}: ready")
PY
