"""Observability: ``metrics.jsonl`` (one JSON object per optimizer step), a console line, wandb.

Only rank 0 writes. Non-finite numbers are written as ``null`` (JSON has no NaN). wandb is
optional: offline unless ``WANDB_MODE`` says otherwise, files under the run dir, and any import
or init failure becomes a warning.

MFU = training FLOPs per sample x samples/s / (ranks x peak FLOP/s of one device). FLOPs per
sample are counted as ``mdm_dist.inspect`` counts them (3 x forward of backbone + text encoder +
two text decodes, on the meta device); the peak is the dense bf16 tensor-core figure of the GPU
named by ``torch.cuda.get_device_name`` (table below; unknown GPU or CPU -> ``mfu: null``).
"""

from __future__ import annotations

import json
import math
import os
import resource
import sys
import warnings
from pathlib import Path

import torch

# Dense bf16 peak, FLOP/s (vendor datasheets, without sparsity). Matched by substring, in order.
PEAK_BF16_FLOPS = (
    ("GH200", 989e12), ("H200", 989e12), ("H100 PCIe", 756e12), ("H100", 989e12), ("H800", 989e12),
    ("B200", 2250e12), ("B100", 1750e12), ("A100", 312e12), ("A800", 312e12), ("L40S", 362e12),
    ("A10G", 70e12), ("L4", 121e12), ("A6000", 155e12), ("V100", 125e12), ("MI300X", 1307e12),
    ("MI250X", 383e12),
)


def peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, value in PEAK_BF16_FLOPS:
        if key in name:
            return value
    return None


def train_flops_per_sample(cfg) -> int:
    """Training FLOPs of one sample, counted on the meta device (see mdm_dist.inspect)."""
    from mdm_dist.inspect import forward_flops
    from mdm_dist.models.mdm import build_model

    f = forward_flops(build_model(cfg, device="meta"), cfg)
    return 3 * (f["backbone"] + f["vae_text_encode"] + 2 * f["vae_text_decode"])


def memory_gb(device: torch.device) -> float:
    """Peak memory of this process: CUDA max allocated on GPU, max RSS on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 1024**3
    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kb / 1024**2


def _clean(v):
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


class MetricsLogger:
    """Rank 0 writes ``metrics.jsonl``, prints a progress line, logs to wandb; other ranks no-op."""

    def __init__(self, run_dir: Path, cfg, rank: int, resume: bool = False):
        self.rank = rank
        self.path = Path(run_dir) / "metrics.jsonl"
        self.file = None
        self.wandb = None
        if rank != 0:
            return
        self.file = open(self.path, "a" if resume else "w")
        os.environ.setdefault("WANDB_MODE", "offline")
        if os.environ["WANDB_MODE"] == "disabled":
            return
        os.environ.setdefault("WANDB_DIR", str(run_dir))
        try:
            import wandb

            self.wandb = wandb.init(project=os.environ.get("WANDB_PROJECT", "mdm-dist"), name=Path(run_dir).name,
                                    config=cfg.to_dict(), dir=str(run_dir), resume="allow")
        except Exception as e:  # noqa: BLE001 - wandb is never required
            warnings.warn(f"wandb disabled: {type(e).__name__}: {e}", stacklevel=2)
            self.wandb = None

    def log(self, record: dict) -> None:
        if self.rank != 0:
            return
        record = {k: _clean(v) for k, v in record.items()}
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        if self.wandb is not None:
            try:
                self.wandb.log({k: v for k, v in record.items() if isinstance(v, (int, float))}, step=record["step"])
            except Exception as e:  # noqa: BLE001
                warnings.warn(f"wandb.log failed, wandb disabled: {e}", stacklevel=2)
                self.wandb = None

    def console(self, record: dict, max_steps: int) -> None:
        if self.rank != 0:
            return
        def f(k, fmt):
            v = record.get(k)
            return "-" if v is None or (isinstance(v, float) and not math.isfinite(v)) else format(v, fmt)
        terms = " ".join(f"{k}={f(k, '.4f')}" for k in ("se_txt", "se_img", "rec_txt", "kl", "align") if record.get(k) is not None)
        mfu = f"mfu={record['mfu']:.1%} " if record.get("mfu") is not None else ""
        skip = f" SKIPPED ({record.get('skip_reason')})" if record.get("skipped") else ""
        print(f"step {record['step']:>6d}/{max_steps} loss={f('loss', '.4f')} {terms} lr={f('lr', '.2e')} "
              f"gnorm={f('grad_norm', '.3f')} {f('samples_per_s', '.1f')} samples/s "
              f"{f('tokens_per_s', '.0f')} tok/s {mfu}mem={f('mem_gb', '.2f')}GB{skip}", file=sys.stdout, flush=True)

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
        if self.wandb is not None:
            try:
                self.wandb.finish()
            except Exception:  # noqa: BLE001
                pass
