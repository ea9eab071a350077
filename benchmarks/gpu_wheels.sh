#!/usr/bin/env bash
# Wheels the GPU machine lacks for `python3 -m benchmarks.gpu`, fetched HERE (where pip reaches
# PyPI) into .whl/ (git-ignored; name it in the device tool's `carry`), and installed THERE
# (no package registry) into /tmp/site.
#
#   bash benchmarks/gpu_wheels.sh              # here: download into .whl/ (about 4 MiB), check deps
#   bash benchmarks/gpu_wheels.sh --install    # there: pip install --no-index .whl/*.whl -> /tmp/site
#   export PYTHONPATH=/tmp/site:$PWD           # then: python3 -m benchmarks.gpu --output DIR
#
# The GPU image (python 3.12, x86-64) already has torch, torchvision, triton, numba, numpy,
# scipy, scikit-learn, timm, regex, tqdm, huggingface_hub, safetensors, pillow, matplotlib,
# pytest; it lacks open_clip_torch (needs ftfy -> wcwidth) and POT. pydensecrf2 is NOT
# carried: the GPU check never imports it (the dense-CRF / mutual-knowledge parts are skipped).
set -euo pipefail
cd "$(dirname "$0")/.."
DIR=${GPU_WHEEL_DIR:-.whl}
PY=${PYTHON:-python3}
# Pinned to the versions the test suite runs with; one version of each (two stop the install).
WHEELS=(
  "open_clip_torch==3.3.0"
  "ftfy==6.3.1"
  "wcwidth==0.9.4"
  "pot==0.9.7.post1"
)

if [[ "${1:-}" == "--install" ]]; then
  SITE=${GPU_SITE:-/tmp/site}
  shopt -s nullglob
  whls=("$DIR"/*.whl)
  if (( ${#whls[@]} == 0 )); then
    echo "gpu_wheels: no wheels in $DIR; run 'bash benchmarks/gpu_wheels.sh' where pip works, and carry $DIR" >&2
    exit 1
  fi
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" "${whls[@]}"
  echo "gpu_wheels: installed ${#whls[@]} wheels into $SITE; now: export PYTHONPATH=$SITE:\$PWD"
  exit 0
fi

mkdir -p "$DIR"
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d "$DIR" "${WHEELS[@]}"
echo "gpu_wheels: $(ls "$DIR"/*.whl | wc -l) wheels in $DIR, $(du -sh "$DIR" | cut -f1) in all"
# what each wheel needs (extras left out), to check against the GPU image's package list
for w in "$DIR"/*.whl; do
  echo "  $(basename "$w"):"
  (unzip -p "$w" '*.dist-info/METADATA' | grep '^Requires-Dist' | grep -v 'extra ==' | sed 's/^/    /') || true
done
