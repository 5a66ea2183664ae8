# mdm-dist: every target installs what it needs first (scripts/install.sh is a no-op when the
# venv is up to date). Caches stay inside the repo (.cache/), never in the home folder or /tmp.
PY      := .venv/bin/python
CACHE   := $(CURDIR)/.cache
export TORCH_EXTENSIONS_DIR := $(CACHE)/torch_extensions
export TRITON_CACHE_DIR     := $(CACHE)/triton
export WANDB_DIR            := $(CACHE)/wandb
export WANDB_MODE           ?= offline
export MPLCONFIGDIR         := $(CACHE)/matplotlib
export OMP_NUM_THREADS      ?= 2
export DS_ACCELERATOR       ?= cpu

.PHONY: install test demo demo-full inspect clean

install:
	@scripts/install.sh

test: install
	@mkdir -p $(CACHE)
	$(PY) -m pytest -q --durations=15 tests

# The embedded end-to-end demo (launch/demo.py: corpus -> tokenizer -> VAE -> MDS -> deepspeed
# pretraining on 2 CPU processes -> held-out sampling and scoring); DEMO_ARGS=--quick shortens it.
demo: install
	@mkdir -p $(CACHE)
	$(PY) launch/demo.py --output outputs/demo $(DEMO_ARGS)
	$(PY) -m mdm_dist.inspect configs/7b.yaml

# The same stages without the 20-minute budget, long enough to reach the quality targets: the
# Muon VAE (its reconstructions bound text-to-image at 0.93, AdamW's 240 s at 0.82) and 2000
# pretraining steps of 256. 76 minutes on 2 AVX2 cores: text-to-image 84%, captioning 92%
# (benchmarks/demo_results.md, eighteenth session).
demo-full: install
	@mkdir -p $(CACHE)
	$(PY) launch/demo.py --output outputs/demo_full --time-budget 0 --vae-optimizer muon --vae-steps 1870 --steps 2000 $(DEMO_ARGS)

inspect: install
	$(PY) -m mdm_dist.inspect $(or $(CONFIG),configs/7b.yaml)

clean:
	rm -rf .cache outputs
