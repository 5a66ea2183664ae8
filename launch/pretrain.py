"""MDM pretraining: DeepSpeed ZeRO, sequence parallelism, exact resume.

    deepspeed [--num_accelerators N | --hostfile H] launch/pretrain.py --config FILE \
        [--data MDS_DIR ...] [--run-dir DIR] [--resume auto|PATH] [--set key=value ...]
    torchrun --nproc_per_node N launch/pretrain.py --config FILE ...
    python launch/pretrain.py --config FILE ...           # one process (gloo world of 1)

The run directory (``--run-dir``, default ``runs/<config name>``) receives ``config.yaml`` (the
resolved config), ``ds_config.json``, ``metrics.jsonl`` (one JSON per optimizer step),
``checkpoints/`` (DeepSpeed + trainer state, ``latest``), ``samples/`` (every
``train.sample_every`` steps: text-to-image PNG grid and generated captions) and ``export/``
(consolidated safetensors, raw and EMA, at the end of the run). SIGTERM / SIGUSR1 save a
checkpoint at the next step boundary and exit 0; ``--resume auto`` continues from it.

Exit codes: 0 done or pre-empted after saving; 2 bad command line or config (the message names
the key and the allowed keys or values); 3 too many non-finite steps in a row.
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

from mdm_dist.config import ConfigError, dump_config, load_config  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog=__doc__.split("\n\n", 1)[1])
    ap.add_argument("--config", required=True, help="YAML config (configs/*.yaml)")
    ap.add_argument("--data", nargs="+", default=None, metavar="MDS_DIR",
                    help="MDS stream directories (override data.paths)")
    ap.add_argument("--run-dir", default=None, help="output directory (default runs/<config name>)")
    ap.add_argument("--resume", default=None, metavar="auto|PATH",
                    help="auto: continue the latest checkpoint of the run dir (fresh start if none); "
                         "PATH: a checkpoint tag folder or a folder with a 'latest' file")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="config override, e.g. --set train.max_steps=100 (repeatable)")
    ap.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)  # deepspeed
    return ap.parse_args(argv)


def resolve_config(args):
    overrides = list(args.set)
    if args.data:
        overrides.append("data.paths=" + json.dumps([str(p) for p in args.data]))
    return load_config(args.config, overrides)


def batch_stream(loader):
    """Micro-batches forever: a new epoch (a new ``iter``) whenever one ends."""
    while True:
        empty = True
        for batch in loader:
            empty = False
            yield batch
        if empty and getattr(loader, "_mdm_epochs_seen", 0) > 0:
            raise RuntimeError("the data loader yields no batches (dataset smaller than one batch per rank?)")
        loader._mdm_epochs_seen = getattr(loader, "_mdm_epochs_seen", 0) + 1


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        cfg = resolve_config(args)
    except ConfigError as e:
        print(f"pretrain.py: error: {e}", file=sys.stderr)
        return 2
    if not cfg.data.paths:
        print("pretrain.py: error: no data: pass --data MDS_DIR ... or set data.paths", file=sys.stderr)
        return 2

    import warnings

    import torch

    warnings.filterwarnings("ignore", message=".*reduce_scatter_tensor.* is deprecated", category=FutureWarning)
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # before deepspeed is imported
    import torch.distributed as dist

    from mdm_dist.data.loader import loader_from_config, prepare_streaming_env
    from mdm_dist.parallel.groups import ParallelLayoutError
    from mdm_dist.train.budget import StepBudget
    from mdm_dist.train.checkpoint import export_weights, load_checkpoint, resolve_resume, save_checkpoint
    from mdm_dist.train.ema import EMA
    from mdm_dist.train.engine import build_training, init_distributed, train_step
    from mdm_dist.train.metrics import MetricsLogger, memory_gb, peak_flops, train_flops_per_sample
    from mdm_dist.train.preempt import PreemptionFlag
    from mdm_dist.train.samples import Decoder, training_samples
    from mdm_dist.train.schedule import lr_at

    device = init_distributed()
    rank, world = dist.get_rank(), dist.get_world_size()
    run_dir = Path(args.run_dir or REPO / "runs" / cfg.name)
    ckpt_dir = run_dir / "checkpoints"
    preempt = PreemptionFlag()  # early: a signal during setup still stops the run at step 0
    try:
        tr = build_training(cfg, device)
    except (ConfigError, ParallelLayoutError) as e:
        if rank == 0:
            print(f"pretrain.py: error: {e}", file=sys.stderr)
        return 2
    engine, t = tr.engine, cfg.train
    if rank == 0:
        (run_dir / "samples").mkdir(parents=True, exist_ok=True)
        dump_config(cfg, run_dir / "config.yaml")
        (run_dir / "ds_config.json").write_text(json.dumps(tr.ds_config, indent=1))

    prepare_streaming_env()
    _, loader = loader_from_config(cfg)
    ema = EMA(tr.mdm, t.ema_decay, warmup=t.ema_warmup)
    budget = StepBudget(t.time_budget_s, t.max_steps, warmup_steps=t.warmup_steps)
    step = 0
    found = resolve_resume(args.resume, ckpt_dir) if args.resume else None
    if found is not None:
        step, loader_state, _, extra = load_checkpoint(engine, *found, ema)
        loader.load_state_dict(loader_state)
        if "budget" in extra:
            budget.load_state_dict(extra["budget"])
        if rank == 0:
            print(f"resumed from {found[0]}/{found[1]} at step {step}", flush=True)
    metrics = MetricsLogger(run_dir, cfg, rank, resume=found is not None)
    decode = Decoder(cfg.data.tokenizer, cfg.vae.pad_id, cfg.vae.mask_id)
    flops_per_sample = train_flops_per_sample(cfg)
    peak = peak_flops(device)
    gas = engine.gradient_accumulation_steps()
    if rank == 0:
        print(f"world {world} (dp {tr.groups.dp_size} x sp {tr.groups.sp_size}), ZeRO {tr.zero_stage}, "
              f"micro {t.micro_batch_size} x accumulation {gas}, global batch {t.global_batch_size}, "
              f"{tr.seq_len} tokens/sample, run dir {run_dir}", flush=True)

    def save(at_step: int) -> None:
        save_checkpoint(engine, ckpt_dir, at_step, cfg.to_dict(), loader.state_dict(), ema,
                        extra={"budget": budget.state_dict(time.perf_counter())})
        if rank == 0:
            print(f"saved checkpoint {ckpt_dir}/step_{at_step:08d}", flush=True)

    batches = batch_stream(loader)
    bad_streak = bad_total = 0
    last_saved = step
    budget.start(time.perf_counter())
    while step < budget.max_steps:
        t0 = time.perf_counter()
        micro = [next(batches) for _ in range(gas)]
        lr = lr_at(step, t.lr, t.min_lr, t.warmup_steps, budget.max_steps, budget.anchor)
        res = train_step(tr, cfg, micro, step, lr)
        if res.skipped:
            bad_streak, bad_total = bad_streak + 1, bad_total + 1
        else:
            ema.update()
            bad_streak = 0
        if device.type == "cuda":
            torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        step += 1
        sps = t.global_batch_size / dt
        record = {"step": step, "loss": res.terms["total"],
                  **{k: v for k, v in res.terms.items() if k != "total"},
                  "lr": lr, "grad_norm": res.grad_norm, "samples_per_s": sps, "tokens_per_s": sps * tr.seq_len,
                  "mfu": flops_per_sample * sps / (world * peak) if peak else None,
                  "mem_gb": memory_gb(device), "step_time_s": dt, "skipped": res.skipped,
                  "skip_reason": res.reason or None, "bad_steps": bad_total, "bad_streak": bad_streak}
        metrics.log(record)
        decided = budget.after_step(step, dt, time.perf_counter())
        if decided and rank == 0:
            print(decided, flush=True)
        if step == 1 or step % t.log_every == 0 or res.skipped or step == budget.max_steps:
            metrics.console(record, budget.max_steps)
        if bad_streak >= t.max_bad_steps:
            if rank == 0:
                print(f"pretrain.py: stopping at step {step}: {bad_streak} non-finite steps in a row "
                      f"(train.max_bad_steps = {t.max_bad_steps}; {bad_total} skipped in all; last: {res.reason}). "
                      f"The weights are those before the first bad step; the last checkpoint is under {ckpt_dir}. "
                      "Check the data of these steps or lower train.lr.", file=sys.stderr, flush=True)
            metrics.close()
            return 3
        if t.save_every and step % t.save_every == 0:
            save(step)
            last_saved = step
        if t.sample_every and step % t.sample_every == 0:
            training_samples(tr.mdm, micro[0], cfg, step, run_dir / "samples", device, decode)
        if preempt.should_stop():
            if last_saved != step:
                save(step)
            if rank == 0:
                print(f"pre-empted (signal {preempt.signum or 'on another rank'}): saved at step {step}, exiting; "
                      "continue with --resume auto", flush=True)
            metrics.close()
            return 0
        if budget.spent(step, time.perf_counter()):
            if rank == 0:
                print(f"time budget of {t.time_budget_s:.0f} s spent at step {step} of {budget.max_steps}: stopping "
                      "here (the learning rate had not finished its decay); the run is saved and exported as at "
                      "its end", flush=True)
            break
    if last_saved != step:
        save(step)
    export_weights(tr.mdm, ema, run_dir / "export", cfg)
    if rank == 0:
        if budget.enabled:  # the plans the time budget made (also in every checkpoint)
            (run_dir / "budget.json").write_text(json.dumps(budget.state_dict(time.perf_counter()), indent=1) + "\n")
        print(f"done: {step} steps, {bad_total} skipped; weights in {run_dir / 'export'}", flush=True)
    metrics.close()
    return 0


if __name__ == "__main__":
    code = main()
    try:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()
    except Exception:  # noqa: BLE001
        pass
    sys.exit(code)
