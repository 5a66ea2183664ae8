"""Checkpoints: DeepSpeed's (model, optimizer, ZeRO partitions) plus the trainer's own state.

Layout of ``<run_dir>/checkpoints``::

    latest                          the newest complete tag (DeepSpeed writes it last)
    step_00000200/                  one tag per save
        ...                         DeepSpeed's files (mp_rank_00_model_states.pt, zero shards)
        trainer_rank00000.pt        per rank: loader state, RNG states (torch, numpy, python,
        trainer_rank00001.pt        cuda), the EMA shards of this rank
    (client state inside DeepSpeed's model-states file: step, resolved config, world size)

The per-rank files are written before ``engine.save_checkpoint``, which moves ``latest`` last,
so ``latest`` never names a half-written checkpoint. Resuming needs the same world size and
sequence-parallel layout (ZeRO partitions and EMA shards are per rank); DeepSpeed's
``zero_to_fp32`` or :func:`export_weights` give layout-free weights.
"""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from mdm_dist.train.ema import EMA, gather_full

TAG_FORMAT = "step_{:08d}"


def rank_file(tag_dir: Path, rank: int) -> Path:
    return Path(tag_dir) / f"trainer_rank{rank:05d}.pt"


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def save_checkpoint(engine, ckpt_dir: Path, step: int, cfg_dict: dict, loader_state: dict, ema: EMA,
                    extra: dict | None = None) -> Path:
    """Save after optimizer step ``step`` (so a resume starts at ``step``); collective."""
    tag = TAG_FORMAT.format(step)
    tag_dir = Path(ckpt_dir) / tag
    tag_dir.mkdir(parents=True, exist_ok=True)
    rank = dist.get_rank()
    torch.save({"step": step, "loader": loader_state, "rng": rng_state(), "ema": ema.state_dict(),
                "extra": extra or {}}, rank_file(tag_dir, rank))
    dist.barrier()
    client = {"step": step, "config": cfg_dict, "world_size": dist.get_world_size()}
    engine.save_checkpoint(str(ckpt_dir), tag=tag, client_state=client)
    dist.barrier()
    return tag_dir


def resolve_resume(resume: str, ckpt_dir: Path) -> tuple[Path, str] | None:
    """``auto`` -> the latest checkpoint under ``ckpt_dir`` or None (fresh start); a path -> that
    checkpoint: a tag directory, or a folder with a ``latest`` file. Returns (load_dir, tag)."""
    if resume == "auto":
        latest = Path(ckpt_dir) / "latest"
        if not latest.is_file():
            return None
        return Path(ckpt_dir), latest.read_text().strip()
    p = Path(resume)
    if (p / "latest").is_file():
        return p, (p / "latest").read_text().strip()
    if p.is_dir() and rank_file(p, 0).is_file():
        return p.parent, p.name
    raise FileNotFoundError(
        f"--resume {resume}: not a checkpoint (expected a tag folder holding trainer_rank00000.pt, or a "
        "folder with a 'latest' file, e.g. <run_dir>/checkpoints); use --resume auto to continue a run dir"
    )


def load_checkpoint(engine, load_dir: Path, tag: str, ema: EMA) -> tuple[int, dict, dict, dict]:
    """Restore the engine, this rank's RNG states and EMA shards. Returns (step, loader state,
    client state, the ``extra`` dict given to :func:`save_checkpoint`)."""
    path = rank_file(Path(load_dir) / tag, dist.get_rank())
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} is missing: the checkpoint was written by a different number of ranks; resume "
            "with the same world size, or export the weights and start a new run from them"
        )
    load_path, client = engine.load_checkpoint(str(load_dir), tag=tag)
    if load_path is None:
        raise RuntimeError(f"DeepSpeed could not load the checkpoint {load_dir}/{tag}")
    if client.get("world_size") not in (None, dist.get_world_size()):
        raise RuntimeError(f"checkpoint {load_dir}/{tag} was written by {client['world_size']} ranks, "
                           f"this run has {dist.get_world_size()}")
    state = torch.load(path, map_location="cpu", weights_only=False)
    set_rng_state(state["rng"])
    ema.load_state_dict(state["ema"])
    return int(state["step"]), state["loader"], client, state.get("extra") or {}


def export_weights(mdm: torch.nn.Module, ema: EMA | None, out_dir: Path, cfg, prefix: str = "") -> list[Path]:
    """Consolidated weights for sampling: ``model.safetensors`` (raw) and ``model_ema.safetensors``
    (EMA), fp32, names as in ``MDM.state_dict()``, plus ``config.yaml``. Collective (gathers the
    ZeRO-3 partitions); rank 0 writes."""
    from safetensors.torch import save_file

    from mdm_dist.config import dump_config

    params = dict(mdm.named_parameters())
    raw = gather_full(params)
    shadow = None
    if ema is not None:
        shards = {n[len(prefix):]: t for n, t in ema.shadow.items() if n.startswith(prefix)}
        shadow = gather_full(params, shards)
    buffers = {n: b.detach().cpu().clone() for n, b in mdm.named_buffers() if n in mdm.state_dict()}
    written = []
    if dist.get_rank() == 0:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        meta = {"format": "mdm-dist", "source": "launch/pretrain.py"}
        save_file({**raw, **buffers}, str(out / "model.safetensors"), metadata=meta)
        written.append(out / "model.safetensors")
        if shadow is not None:
            save_file({**shadow, **buffers}, str(out / "model_ema.safetensors"), metadata=meta)
            written.append(out / "model_ema.safetensors")
        dump_config(cfg, out / "config.yaml")
    dist.barrier()
    return written
