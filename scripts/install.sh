#!/usr/bin/env bash
# Create (or refresh) the project's virtual environment from the repo's own files.
#   scripts/install.sh [--venv DIR] [--gpu]
# Re-running is cheap: a stamp holding the hash of the requirement files skips a venv that is
# already up to date. See requirements.txt for why the install runs in two steps.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=.venv
GPU=0
while [ $# -gt 0 ]; do
  case "$1" in
    --venv) VENV="$2"; shift 2 ;;
    --gpu) GPU=1; shift ;;
    -h|--help) sed -n '2,5p' "$0"; exit 0 ;;
    *) echo "install.sh: unknown argument '$1' (allowed: --venv DIR, --gpu)" >&2; exit 2 ;;
  esac
done
mkdir -p "$(dirname "$VENV")"
VENV="$(cd "$(dirname "$VENV")" && pwd)/$(basename "$VENV")"  # absolute: the import check runs from /
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null || PY=python3
"$PY" -c 'import sys; assert sys.version_info[:2] == (3, 11), sys.version' 2>/dev/null || {
  echo "install.sh: mdm-dist pins a Python 3.11 stack; '$PY' is $("$PY" --version 2>&1). Set PYTHON=/path/to/python3.11." >&2
  exit 2
}
stamp="$VENV/.mdm-dist-installed"
want=$(cat requirements.txt requirements-gpu.txt pyproject.toml scripts/install.sh | sha256sum | cut -c1-16)-gpu$GPU
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
echo "[install] creating $VENV (Python $("$PY" --version 2>&1 | cut -d' ' -f2))"
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
# pip's output without the find-links noise of this machine's pip config; pip's exit status is kept.
pip() {
  local rc=0
  "$VENV/bin/python" -m pip --disable-pip-version-check --no-input "$@" > "$VENV/.pip.log" 2>&1 || rc=$?
  grep -v "^WARNING: Location" "$VENV/.pip.log" || true
  [ $rc = 0 ] || { echo "install.sh: 'pip $*' failed (exit $rc)" >&2; exit $rc; }
}
export PIP_PROGRESS_BAR=off
# 1. The complete lock (torch, and the setuptools with bdist_wheel the editable install needs,
#    among it), without a resolver, except the two packages built from source here. They import
#    torch while they build (--no-build-isolation), and torch imports only once its own
#    requirements (typing_extensions, the CUDA libraries of the CUDA wheel, ...) are in: so they
#    come last. On a machine with a warm pip cache the order did not matter, on a fresh one it does.
built='^(mamba[-_]ssm|causal[-_]conv1d)=='
echo "[install] 1/3 requirements.txt (locked, --no-deps)"
grep -v -i -E "$built" requirements.txt > "$VENV/.lock-wheels.txt"
pip install -q --no-deps -r "$VENV/.lock-wheels.txt"
# 2. mamba-ssm and causal-conv1d: pure-Python builds on CPU (their CUDA extensions skipped).
second=$(grep -i -E "$built" requirements.txt | cut -d' ' -f1)
echo "[install] 2/3 $(echo $second) (built against the installed torch)"
MAMBA_SKIP_CUDA_BUILD=TRUE MAMBA_FORCE_BUILD=TRUE \
CAUSAL_CONV1D_SKIP_CUDA_BUILD=TRUE CAUSAL_CONV1D_FORCE_BUILD=TRUE \
  pip install -q --no-deps --no-build-isolation $second
if [ "$GPU" = 1 ]; then
  echo "[install] GPU extras (requirements-gpu.txt, built with CUDA)"
  MAMBA_FORCE_BUILD=TRUE CAUSAL_CONV1D_FORCE_BUILD=TRUE \
    pip install -q --no-deps --no-build-isolation --force-reinstall -r requirements-gpu.txt
fi
echo "[install] 3/3 mdm-dist (editable)"
pip install -q --no-deps --no-build-isolation -e .
(cd / && "$VENV/bin/python" -W ignore -c "import torch, deepspeed, streaming, megatron.core, triton, mdm_dist, kernels") \
  || { echo "install.sh: the installed stack does not import; see the errors above" >&2; exit 1; }
echo "$want" > "$stamp"
echo "[install] done: $VENV"
