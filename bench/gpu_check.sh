#!/usr/bin/env bash
# The GPU checks of issues 3 and 4, for a lent GPU machine (its image has torch with CUDA but
# not black or pymetis: carry them as wheels in .whl/, see README "GPU check").
#   bash bench/gpu_check.sh        -> prints the figures, writes $OUT/gpu_check.json
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/ftc_site .whl/*.whl
  export PYTHONPATH=/tmp/ftc_site${PYTHONPATH:+:$PYTHONPATH}
fi
python3 -m pip install -q --no-deps --no-build-isolation --no-index -e . >/dev/null
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
export PYTHONUNBUFFERED=1 FTC_CACHE_DIR=/tmp/ftc_profile_cache
python3 bench/gpu_check.py
