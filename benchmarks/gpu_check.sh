#!/usr/bin/env bash
# GPU check of the Triton SSD scan (and the trainer), for a machine with one NVIDIA GPU; < 6 minutes
# (< 8 with --train).
#   benchmarks/gpu_check.sh [--gpu-extras] [--train]
# 1. the venv (scripts/install.sh; a no-op when up to date). mamba-ssm's scan kernels are Triton
#    and need none of its CUDA extensions, so the baseline runs from the base install;
#    --gpu-extras also builds flash-attn / mamba-ssm / causal-conv1d with CUDA (slow, not needed).
# 2. pytest -m gpu: the compiled kernels (scan, ordered conv) against the references on CUDA in
#    fp32 and bf16; flash-attn against float64 attention; the tiny MDM in bf16 on CUDA vs CPU;
#    meanwhile, compile-only runs of the benchmark fill the Triton cache.
# 3. benchmarks/scan_throughput.py in bf16 (1 and 4 directions, fwd and fwd+bwd, 4K-64K tokens,
#    sequential and chunk-parallel kernels, mamba-ssm's; the 4-direction mixers).
# 4. with --train: benchmarks/train_throughput.py for configs/350m.yaml (+ a profile).
# Everything lands in benchmarks/results/, named by the device.
# On a node without package access whose image brings its own CUDA torch + triton (another
# Python too), skip the venv:  PYTHON=python3 GPU_SITE=.gpusite benchmarks/gpu_check.sh
# where .gpusite was packed by scripts/offline_site.sh on a machine with the venv.
set -euo pipefail
cd "$(dirname "$0")/.."
EXTRAS=0
TRAIN=0
for arg in "$@"; do
  case "$arg" in
    --gpu-extras) EXTRAS=1 ;;
    --train) TRAIN=1 ;;
    *) echo "gpu_check.sh: unknown argument '$arg' (allowed: --gpu-extras, --train)" >&2; exit 2 ;;
  esac
done
export TRITON_CACHE_DIR="$PWD/.cache/triton" TORCH_EXTENSIONS_DIR="$PWD/.cache/torch_extensions"
export PYTHONUNBUFFERED=1
unset TRITON_INTERPRET
mkdir -p .cache benchmarks/results
if [ -n "${PYTHON:-}" ]; then
  PY=$PYTHON
  [ -n "${GPU_SITE:-}" ] && export PYTHONPATH="$(cd "$GPU_SITE" && pwd):$PWD${PYTHONPATH:+:$PYTHONPATH}"
  $PY -c 'import sys, torch, triton; print(f"[gpu_check] {sys.executable}: Python {sys.version.split()[0]}, torch {torch.__version__}, triton {triton.__version__}")'
else
  PY=.venv/bin/python
  if [ "$EXTRAS" = 1 ]; then scripts/install.sh --gpu; else scripts/install.sh; fi
fi
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
DEV=$($PY -c 'import re, torch; assert torch.cuda.is_available(), "no CUDA device"; print(re.sub(r"[^A-Za-z0-9]+", "-", torch.cuda.get_device_name()).strip("-").lower())')
echo "[gpu_check] device: $DEV"
status=0
T0=$SECONDS
# Triton compiles each kernel specialization once per machine (~10-20 s apiece on a lent H100/H200
# node, single-threaded), so phase 1 runs the GPU tests and fills the Triton cache for the benchmark's
# rows in parallel processes; phase 2 then times them one at a time on a quiet GPU.
# (the settings with the fewest register spills, benchmarks/kernel_resources.py: the blocked
# backward; the forward with 8 warps or chunks of 16; and the sequential backward for reference)
TUNES="bwd_chunk=32,bwd_nblock=32 bwd_nblock=16 bwd_parallel=0 fwd_warps=8 fwd_chunk=16"
SCAN="$PY benchmarks/scan_throughput.py --device cuda"
# 1. GPU tests (pytest-xdist where installed) beside the compile-only warm-up processes (< 130 s)
XDIST=""; $PY -c 'import xdist' 2>/dev/null && XDIST="-n 4"
timeout 130 $PY -m pytest -v -m gpu tests $XDIST -p no:cacheprovider --durations=8 \
  --junitxml="benchmarks/results/gpu_tests_$DEV.xml" > "benchmarks/results/gpu_tests_$DEV.log" 2>&1 &
TESTS=$!
warm=()
for K in 1 4; do
  timeout 120 $SCAN --compile-only --lengths 4096 --directions $K --rows auto --no-mixer >/dev/null 2>&1 & warm+=($!)
  timeout 120 $SCAN --compile-only --lengths 4096 --directions $K --rows mamba --no-mixer >/dev/null 2>&1 & warm+=($!)
  for t in $TUNES; do
    timeout 120 $SCAN --compile-only --lengths 4096 --directions $K --rows tune --tune $t --tune-lengths 4096 \
      --no-mixer >/dev/null 2>&1 & warm+=($!)
  done
done
timeout 120 $SCAN --compile-only --lengths 4096 --directions 1 --rows auto --mixer-tune "" bwd_parallel=0 >/dev/null 2>&1 & warm+=($!)
timeout 120 $SCAN --compile-only --lengths 4096 --directions 1 --rows mamba >/dev/null 2>&1 & warm+=($!)
wait "${warm[@]}" || true
wait $TESTS || status=1
cat "benchmarks/results/gpu_tests_$DEV.log"
echo "[gpu_check] phase 1 (tests, compiling) done after $((SECONDS - T0)) s"
# 2. the timed scan benchmark (the JSON is rewritten after every row, so a timeout keeps what ran):
#    16K first (the target range), then 4K: the defaults, the launch settings above and mamba-ssm's
#    kernels with copies; the 4-direction mixers (ours with either scan, mamba-ssm's); then 64K
#    (results/scan_64k/)
timeout 160 $SCAN --lengths 16384 4096 --rows auto,tune,mamba --tune $TUNES --tune-lengths 16384 4096 \
  --mixer-tune "" bwd_parallel=0 2>&1 | tee "benchmarks/results/scan_throughput_$DEV.log" || status=1
timeout 60 $SCAN --lengths 65536 --rows auto,tune,mamba --tune $TUNES --tune-lengths 65536 --no-mixer \
  --out benchmarks/results/scan_64k 2>&1 | tee "benchmarks/results/scan_throughput_64k_$DEV.log" || status=1
echo "[gpu_check] phase 2 (scan benchmark) done after $((SECONDS - T0)) s"
# 3. with --train: training throughput of 350m on one GPU (bf16, checkpointing every block, ZeRO-3),
#    2 micro-batches of 8 per step, with the top operators of one step (torch.profiler);
#    configs/1b.yaml and --zero-stage 0 are one edit away (each ~60 s)
for spec in $([ "$TRAIN" = 1 ] && echo 350m:3); do
  c=${spec%:*}; z=${spec#*:}; name="train_throughput_${c}_zero${z}_$DEV"
  timeout 100 $PY benchmarks/train_throughput.py --config configs/$c.yaml --zero-stage $z --checkpointing every \
    --steps 4 --warmup 2 --set train.global_batch_size=16 --json "benchmarks/results/$name.json" \
    --profile "benchmarks/results/${name}_profile.txt" 2>&1 | tee "benchmarks/results/$name.log" || status=1
done
echo "[gpu_check] done after $((SECONDS - T0)) s"
ls -lR benchmarks/results/ | grep -i -e "$DEV" -e ":$" || true
exit $status
