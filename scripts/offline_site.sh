#!/usr/bin/env bash
# Pack the Python packages that a GPU node's own image lacks into one folder, for a node that can
# reach no package index (an air-gapped cluster node, a lent benchmark machine).
#   scripts/offline_site.sh [--out DIR] [--python-version X.Y]      (defaults: .gpusite, 3.12)
# Such an image usually brings torch (CUDA), triton, numpy, einops, safetensors, PyYAML, tqdm,
# pillow, matplotlib, transformers, psutil, msgpack, ninja, py-cpuinfo and pytest, in versions of
# its own. What mdm-dist needs beyond them is packed here:
#   - pure-Python packages, copied from this project's venv (scripts/install.sh makes it):
#     deepspeed, hjson, pydantic, annotated_types, typing_inspection, mamba_ssm (its Triton
#     kernels are the scan benchmark's baseline; kernels/mamba_ssm_compat.py stands in for its
#     CUDA extension), causal_conv1d (Python part), megatron.core (its compiled dataset helper is
#     left out: mdm-dist uses parallel_state only);
#   - compiled packages, downloaded as wheels for the node's Python (pydantic_core).
# On the node:  PYTHON=python3 GPU_SITE=.gpusite bash benchmarks/gpu_check.sh
# (gpu_check.sh then skips the venv and puts GPU_SITE first on PYTHONPATH.)
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=.gpusite
PYV=3.12
while [ $# -gt 0 ]; do
  case "$1" in
    --out) OUT="$2"; shift 2 ;;
    --python-version) PYV="$2"; shift 2 ;;
    -h|--help) sed -n '2,16p' "$0"; exit 0 ;;
    *) echo "offline_site.sh: unknown argument '$1' (allowed: --out DIR, --python-version X.Y)" >&2; exit 2 ;;
  esac
done
scripts/install.sh
SP=$(.venv/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
PURE="deepspeed hjson pydantic annotated_types typing_inspection mamba_ssm causal_conv1d megatron"
COMPILED="pydantic_core"
rm -rf "$OUT"
mkdir -p "$OUT"
for p in $PURE; do
  [ -d "$SP/$p" ] || { echo "offline_site.sh: '$p' is not in the venv ($SP); run scripts/install.sh" >&2; exit 1; }
  cp -r "$SP/$p" "$OUT/"
  # the dist-info too: packages check each other's versions through importlib.metadata
  for d in "$SP"/*.dist-info; do
    n=$(basename "$d" | sed 's/-[0-9].*//' | tr 'A-Z-' 'a-z_')
    m=$(echo "$p" | tr 'A-Z-' 'a-z_')
    { [ "$n" = "$m" ] || { [ "$p" = megatron ] && [ "$n" = megatron_core ]; }; } && cp -r "$d" "$OUT/"
  done
done
# compiled files built for this machine's Python would not load on the node's
find "$OUT" -name '*.so' -delete
find "$OUT" -name __pycache__ -type d -prune -exec rm -rf {} +
rm -rf "$OUT/deepspeed/inference/v2/kernels"  # CUDA/C++ sources of the inference engine, unused here
tmp=$(mktemp -d)
for p in $COMPILED; do
  v=$(.venv/bin/python -c "import importlib.metadata as m; print(m.version('$p'))")
  .venv/bin/python -m pip download -q --disable-pip-version-check --no-deps --only-binary=:all: \
    --python-version "$PYV" --implementation cp --platform manylinux_2_28_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d "$tmp" "$p==$v" \
    || { echo "offline_site.sh: no wheel of $p==$v for Python $PYV on x86-64 Linux" >&2; exit 1; }
done
for w in "$tmp"/*.whl; do .venv/bin/python -m zipfile -e "$w" "$OUT"; done
rm -rf "$tmp"
echo "[offline_site] $OUT: $(du -sh "$OUT" | cut -f1) for Python $PYV ($(ls "$OUT" | grep -vc dist-info) packages)"
