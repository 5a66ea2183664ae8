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

.PHONY: install test demo inspect clean

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

inspect: install
	$(PY) -m mdm_dist.inspect $(or $(CONFIG),configs/7b.yaml)

clean:
	rm -rf .cache outputs
