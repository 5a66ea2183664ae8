#!/usr/bin/env bash
# GPU check of the Triton SSD scan and the trainer, for a machine with one NVIDIA GPU; < 8 minutes.
#   benchmarks/gpu_check.sh [--gpu-extras]
# 1. the venv (scripts/install.sh; a no-op when up to date). mamba-ssm's scan kernels are Triton
#    and need none of its CUDA extensions, so the baseline runs from the base install;
#    --gpu-extras also builds flash-attn / mamba-ssm / causal-conv1d with CUDA (slow, not needed).
# 2. pytest -m gpu: the compiled kernels (scan, ordered conv) against the references on CUDA in
#    fp32 and bf16; flash-attn against float64 attention; the tiny MDM in bf16 on CUDA vs CPU.
# 3. benchmarks/scan_throughput.py in bf16 (1 and 4 directions, fwd and fwd+bwd, 4K-64K tokens).
# 4. benchmarks/train_throughput.py for configs/350m.yaml and configs/1b.yaml (+ a profile).
# Everything lands in benchmarks/results/, named by the device.
# On a node without package access whose image brings its own CUDA torch + triton (another
# Python too), skip the venv:  PYTHON=python3 GPU_SITE=.gpusite benchmarks/gpu_check.sh
# where .gpusite was packed by scripts/offline_site.sh on a machine with the venv.
set -euo pipefail
cd "$(dirname "$0")/.."
EXTRAS=0
[ "${1:-}" = "--gpu-extras" ] && EXTRAS=1
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
# 1. GPU tests (under 2 minutes; the whole script stays under 8 minutes after the install)
timeout 100 $PY -m pytest -v -m gpu tests -p no:cacheprovider --durations=5 --junitxml="benchmarks/results/gpu_tests_$DEV.xml" \
  2>&1 | tee "benchmarks/results/gpu_tests_$DEV.log" || status=1
# 2. benchmarks (the JSON is rewritten after every row, so a timeout still leaves results)
#    16K first (the target range), then 4K; at 16K also the launch settings below (MDM_SSD_TUNE);
#    `benchmarks/scan_throughput.py --device cuda` alone adds 64K and the 4-direction mixer rows
#    (each launch setting compiles its own kernels: ~10-20 s apiece on an H100 node)
TUNE="parallel=1 parallel=1,fwd_chunk=32,bwd_chunk=32 bwd_chunk=32 fwd_chunk=32,fwd_warps=4"
timeout 150 $PY benchmarks/scan_throughput.py --device cuda --lengths 16384 4096 --no-mixer --block-p 16 64 --tune $TUNE \
  2>&1 | tee "benchmarks/results/scan_throughput_$DEV.log" || status=1
# 3. training throughput of 350m and 1b on one GPU (bf16, checkpointing every block), ZeRO-3 and,
#    for 350m, ZeRO-0 (the cost of stage 3's per-module gathers on one GPU); 2 micro-batches of 8
#    per step: per-sample cost as at the full batch, in a fraction of the time. The 350m ZeRO-3
#    run also writes the top operators of one step (torch.profiler).
for spec in 350m:3 1b:3 350m:0; do
  c=${spec%:*}; z=${spec#*:}; name="train_throughput_${c}_zero${z}_$DEV"
  prof=""; [ "$spec" = 350m:3 ] && prof="--profile benchmarks/results/${name}_profile.txt"
  timeout 70 $PY benchmarks/train_throughput.py --config configs/$c.yaml --zero-stage $z --checkpointing every \
    --steps 4 --warmup 2 --set train.global_batch_size=16 --json "benchmarks/results/$name.json" $prof 2>&1 \
    | tee "benchmarks/results/$name.log" || status=1
done
ls -l benchmarks/results/
exit $status
