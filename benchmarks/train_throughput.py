"""Training throughput of a config: steps/s, samples/s, tokens/s, MFU and peak memory.

    python benchmarks/train_throughput.py --config configs/tiny.yaml [--zero-stage 3] [--sp 1]
        [--checkpointing none|every|every_k] [--steps 10] [--warmup 3] [--set key=value ...] [--json OUT]
        [--profile TOP_OPS.txt]
    deepspeed --num_accelerators 2 benchmarks/train_throughput.py --config configs/tiny.yaml --sp 2
    torchrun --nproc_per_node 8 benchmarks/train_throughput.py --config configs/1b.yaml   # on a GPU node

It runs the trainer's own step (``mdm_dist.train.engine.train_step``: DeepSpeed engine, per-sample
noise, guard) on synthetic batches of the config's shapes (random caption ids and image latents),
so it needs no data and measures the model + parallelism alone. ``--warmup`` steps are not timed.
The result also splits the timed steps' mean time into the engine's forward, backward and
optimizer step (``phase_ms``, rank 0's host clock; on a GPU, where kernels run asynchronously,
the split is only indicative): on CPU, with ZeRO-3 and sequence parallelism, a
step carries fixed costs (collectives, the optimizer step) that larger micro-batches amortize.
MFU uses the training FLOPs per sample of ``mdm_dist.inspect`` and the device's bf16 peak (null on
CPU). Prints one line per result and, with ``--json``, writes them (rank 0).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


def synthetic_batches(cfg, n_image_tokens: int, micro: int, count: int, rank: int):
    import torch

    g = torch.Generator().manual_seed(1000 + rank)
    v = cfg.vae
    out = []
    for i in range(count):
        ids = torch.randint(2, v.vocab_size, (micro, v.max_text_len), generator=g)
        ids[ids == v.mask_id] = 2
        out.append({
            "ids": ids, "category": torch.randint(0, cfg.model.num_categories, (micro,), generator=g),
            "img_mu": torch.randn(micro, n_image_tokens, v.d_z, generator=g),
            "img_logvar": torch.full((micro, n_image_tokens, v.d_z), -4.0),
            "key": [f"bench-{rank}-{i}-{j}" for j in range(micro)],
        })
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", required=True)
    ap.add_argument("--zero-stage", type=int, default=None)
    ap.add_argument("--sp", type=int, default=None, help="parallel.sequence_parallel")
    ap.add_argument("--checkpointing", default=None, choices=("none", "every", "every_k"))
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--set", action="append", default=[])
    ap.add_argument("--json", default=None)
    ap.add_argument("--profile", default=None, metavar="TXT",
                    help="after timing, profile one more step (torch.profiler) and write the top operators (rank 0)")
    ap.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import torch.distributed as dist

    from mdm_dist.config import ConfigError, load_config
    from mdm_dist.train.engine import build_training, init_distributed, train_step
    from mdm_dist.train.metrics import peak_flops, train_flops_per_sample

    overrides = list(args.set)
    if args.zero_stage is not None:
        overrides.append(f"parallel.zero_stage={args.zero_stage}")
    if args.sp is not None:
        overrides.append(f"parallel.sequence_parallel={args.sp}")
    if args.checkpointing is not None:
        overrides.append(f"train.activation_checkpointing={args.checkpointing}")
    try:
        cfg = load_config(args.config, overrides)
    except ConfigError as e:
        print(f"train_throughput.py: error: {e}", file=sys.stderr)
        return 2
    device = init_distributed()
    rank, world = dist.get_rank(), dist.get_world_size()
    tr = build_training(cfg, device)
    gas = tr.engine.gradient_accumulation_steps()
    micro = cfg.train.micro_batch_size
    # SP ranks of a group must hold the same samples: seed the synthetic data by data-parallel rank
    batches = synthetic_batches(cfg, tr.num_image_tokens, micro, gas, tr.groups.dp_rank)
    for b in batches:
        b.update({k: v.to(device) for k, v in b.items() if torch.is_tensor(v)})
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    phases = dict.fromkeys(("forward", "backward", "step"), 0.0)
    engine_calls = {name: getattr(tr.engine, name) for name in phases}

    def timed(name, fn):
        def call(*a, **kw):
            t = time.perf_counter()
            out = fn(*a, **kw)
            phases[name] += time.perf_counter() - t
            return out
        return call

    for name, fn in engine_calls.items():  # instance attributes: engine(...) -> __call__ -> forward
        setattr(tr.engine, name, timed(name, fn))
    for step in range(args.warmup + args.steps):
        if step == args.warmup:
            phases.update(dict.fromkeys(phases, 0.0))  # the warm-up steps are not timed
        if device.type == "cuda":
            torch.cuda.synchronize()
        dist.barrier()
        t0 = time.perf_counter()
        train_step(tr, cfg, batches, step, cfg.train.lr * 0.01)
        if device.type == "cuda":
            torch.cuda.synchronize()
        if step >= args.warmup:
            times.append(time.perf_counter() - t0)
    for name, fn in engine_calls.items():  # the profiled step runs the engine unwrapped
        setattr(tr.engine, name, fn)
    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
        with profile(activities=acts) as prof:
            train_step(tr, cfg, batches, args.warmup + args.steps, cfg.train.lr * 0.01)
            if device.type == "cuda":
                torch.cuda.synchronize()
        if rank == 0:
            ka = prof.key_averages()
            parts = [f"one step of {args.config} {args.set}: {len(ka)} distinct operators"]
            for key in (("self_device_time_total", "self_cpu_time_total") if device.type == "cuda"
                        else ("self_cpu_time_total",)):
                parts.append(f"\n== sorted by {key} ==\n" + ka.table(sort_by=key, row_limit=30))
            Path(args.profile).write_text("\n".join(parts))
            print(f"[train_throughput] profile of one step: {args.profile}", flush=True)
    step_s = sum(times) / len(times)
    sps = cfg.train.global_batch_size / step_s
    peak = peak_flops(device)
    flops = train_flops_per_sample(cfg)
    if device.type == "cuda":
        mem = torch.cuda.max_memory_allocated(device) / 1024**3
    else:
        import resource

        mem = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2
    result = {
        "config": args.config, "overrides": args.set, "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "world": world, "zero_stage": tr.zero_stage, "sequence_parallel": tr.groups.sp_size,
        "activation_checkpointing": cfg.train.activation_checkpointing, "micro_batch": micro,
        "grad_accumulation": gas, "global_batch": cfg.train.global_batch_size, "seq_len": tr.seq_len,
        "steps_per_s": 1.0 / step_s, "samples_per_s": sps, "tokens_per_s": sps * tr.seq_len,
        "train_flops_per_sample": flops, "mfu": flops * sps / (world * peak) if peak else None,
        "peak_mem_gb": mem,
        "step_ms": 1000 * step_s, "phase_ms": {k: 1000 * v / len(times) for k, v in phases.items()},
    }
    if rank == 0:
        mfu = "n/a (no peak known)" if result["mfu"] is None else f"{result['mfu']:.1%}"
        print(f"{args.config} world={world} zero={tr.zero_stage} sp={tr.groups.sp_size} "
              f"ckpt={cfg.train.activation_checkpointing} batch={cfg.train.global_batch_size}: "
              f"{result['steps_per_s']:.2f} steps/s, {sps:.1f} samples/s, {result['tokens_per_s']:.0f} tokens/s, "
              f"MFU {mfu}, peak mem {mem:.2f} GB; per step {1000 * step_s:.0f} ms: "
              + ", ".join(f"{k} {v:.0f}" for k, v in result["phase_ms"].items()), flush=True)
        if args.json:
            Path(args.json).write_text(json.dumps(result, indent=1))
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
