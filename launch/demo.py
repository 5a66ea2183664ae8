"""The embedded end-to-end demo: from nothing to generated images and captions on a laptop CPU.

    python launch/demo.py [--output outputs/demo] [--quick] [--print-commands] [--force STAGE ...]
        [--num-samples N] [--vae-steps N] [--vae-optimizer adamw|muon] [--steps N] [--num-eval N]
        [--sample-steps N] [--guidance W]
        [--caption-guidance W] [--best-of N] [--dtype auto|float32|bfloat16] [--time-budget SECONDS]

Stages, each one command of the repo (``--print-commands`` prints them all and runs nothing, so a
user can run them by hand, one by one):

1. ``corpus``    data_prep/make_demo_data.py: captioned coloured shapes (webdataset tars) and a
                 held-out set with its ground truth (eval.jsonl)
2. ``tokenizer`` data_prep/train_tokenizer.py: the SentencePiece caption tokenizer
3. ``vae``       launch/train_vae.py --config configs/vae_tiny.yaml: the UnifiedVAE stage, data
                 parallel on 2 CPU processes under the same launcher (one thread each)
4. ``encode``    data_prep/encode_laion.py: the corpus as MDS shards of image-latent moments + ids
5. ``pretrain``  deepspeed --num_accelerators 2 launch/pretrain.py --config configs/tiny.yaml:
                 2 CPU processes, ZeRO-3, sequence parallelism 2 (OMP_NUM_THREADS=1 each), in
                 bf16 autocast where the CPU has native bf16 (``--dtype``; then 1080 steps instead
                 of the config's 870, in about the same time), the
                 UnifiedVAE started from stage 3 (``train.vae_checkpoint``), the ``cycle`` scan and
                 an attention block after each of the first 3 Mamba blocks (``--scan-mode``,
                 ``--attention-every``)
6. ``evaluate``  python -m mdm_dist.eval.heldout: text-to-image for held-out captions and captions
                 for held-out images, scored against the corpus's ground truth (mdm_dist/eval)
7. ``report``    (in this script) loss curves from metrics.jsonl and demo_report.json

A stage whose output exists is skipped (``--force STAGE`` reruns it and every later stage); the
pretraining stage resumes from its last checkpoint if it was interrupted. Every stage's output
streams to the console. The output folder receives, beside the stage folders:
``text_to_image.png``, ``image_to_text.png``, ``vae_reconstructions.png``, ``captions.json``/``.md``,
``loss_curves.png`` and ``demo_report.json`` (stage timings, quality figures, targets, met or not).

The demo keeps to ``--time-budget`` (default 1200 s, the 20-minute target): on a machine too slow
for the configured steps, the VAE stage and pretraining train fewer, each fitting its share
(``train.time_budget_s``: VAE_SHARE of the budget for the VAE, what is left less RESERVE_S for
pretraining) and ending its learning-rate schedule there; ``--time-budget 0`` trains the configured
steps however long they take. ``demo_report.json`` records the steps each stage trained.

``--quick`` is a shortened run (small corpus, few steps: minutes, for CI); its quality figures
mean nothing. The defaults are the full demo (about 18 minutes on 2 cores); the training lengths
live in configs/tiny.yaml and configs/vae_tiny.yaml, the corpus size and sampling here.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

PY = sys.executable
STAGES = ("corpus", "tokenizer", "vae", "encode", "pretrain", "evaluate", "report")
TARGETS = {"text_to_image": 0.80, "captioning": 0.80, "total_wall_s": 20 * 60}
# One OpenMP thread per process in the stages of 2 processes: on 2 shared cores, spinning OpenMP
# threads made the VAE stage ~5x slower with 2 threads than with 1. The evaluation runs alone in
# one process: 2 threads took it from 74 to 61 s on the AVX2 machine (benchmarks/demo_results.md).
ONE = {"OMP_NUM_THREADS": "1"}
BOTH_CORES = {"OMP_NUM_THREADS": "2"}
# Pretraining steps under bf16 (the default where the CPU has native bf16): the 2-process trainer
# runs 1.24x the samples/s of fp32 there (benchmarks/demo_results.md), so about as long as the
# 870 fp32 steps of configs/tiny.yaml
BF16_STEPS = 1080
QUICK = {"num_samples": 256, "num_eval": 16, "vae_steps": 8, "steps": 6, "sample_steps": 4}
# The time budget (--time-budget, default the 20-minute target) on a slower machine: the VAE stage
# may spend at most VAE_SHARE of it, and pretraining what is left after the stages before it and
# RESERVE_S for its own start-up and export, the evaluation and the report (about 30 + 63 + 4 s on
# the AVX2 machine of benchmarks/demo_results.md; the rest is margin). Each training stage fits its
# step count into its share (train.time_budget_s, mdm_dist/train/budget.py: planned after 20
# steps, re-planned at 50% and 80% of the share), its schedule ending there. Where the configured
# steps fit, nothing changes. Pretraining gets at least MIN_PRETRAIN_SHARE of the budget, even if
# the demo then runs over it.
# --best-of: text-to-image keeps the best of N candidates per prompt by the model's own caption
# likelihood (mdm_dist.diffusion.sample_best_of). Best of 8 lifted text-to-image 0.29 -> 0.41 at 8x
# the sampling time (benchmarks/demo_results.md), time the 20 minutes do not have: the demo keeps 1.
BEST_OF = 1
VAE_SHARE = 0.2
RESERVE_S = 125.0
MIN_PRETRAIN_SHARE = 0.25
# One loader process per pretraining rank (data.num_workers) reads the next batch from MDS while the
# step computes: the demo's steps 3-14% faster on 2 AVX2 cores (benchmarks/demo_results.md). Not in
# configs/tiny.yaml: on the tests' few-sample streams every epoch would start a new process.
LOADER_WORKERS = 1


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog=__doc__.split("\n\n", 1)[1])
    ap.add_argument("--output", default="outputs/demo", help="output folder (default outputs/demo)")
    ap.add_argument("--quick", action="store_true", help=f"shortened run for CI: {QUICK}")
    ap.add_argument("--print-commands", action="store_true", help="print every stage's command and exit")
    ap.add_argument("--force", nargs="+", default=[], choices=STAGES, metavar="STAGE",
                    help="rerun these stages (and every later one) even if their outputs exist")
    ap.add_argument("--num-samples", type=int, default=None, help="training images in the corpus (default 4000)")
    ap.add_argument("--num-eval", type=int, default=None, help="held-out prompts and images scored (default 100)")
    ap.add_argument("--vae-steps", type=int, default=None, help="VAE steps (default: configs/vae_tiny.yaml)")
    ap.add_argument("--vae-optimizer", choices=("adamw", "muon"), default=None,
                    help="the VAE stage's train.optimizer (default: configs/vae_tiny.yaml's, adamw). muon "
                         "reconstructs better (the classifier reads 0.93 of its reconstructions against 0.82), "
                         "which text-to-image needs to reach 80%%, but under the 20-minute budget the backbone "
                         "learned its latents more slowly (make demo-full uses it; benchmarks/demo_results.md)")
    ap.add_argument("--steps", type=int, default=None, help="MDM pretraining steps (default: configs/tiny.yaml)")
    ap.add_argument("--time-budget", type=float, default=TARGETS["total_wall_s"],
                    help="seconds the whole demo may take (default %(default)s, the target): on a slower machine "
                         "the VAE stage and pretraining train fewer steps so that they fit (each ends its "
                         "learning-rate schedule there); 0 = no budget, the configured steps however long "
                         "they take")
    ap.add_argument("--sample-steps", type=int, default=None, help="sampler steps (default: configs/tiny.yaml)")
    ap.add_argument("--guidance", type=float, default=None,
                    help="CFG scale of both modes unless --caption-guidance is given (default: configs/tiny.yaml)")
    ap.add_argument("--caption-guidance", type=float, default=None,
                    help="CFG scale of captioning only (default: configs/tiny.yaml)")
    ap.add_argument("--best-of", type=int, default=BEST_OF, metavar="N",
                    help="text-to-image keeps the best of N candidates per prompt, ranked by the model's own "
                         "caption likelihood (mdm_dist.diffusion.sample_best_of; default %(default)s, 1 = plain "
                         "sampling)")
    ap.add_argument("--weights", choices=("raw", "ema"), default="raw", help="which exported weights sample (default raw)")
    ap.add_argument("--scan-mode", choices=("cycle", "multi"), default="cycle",
                    help="model.scan_mode for pretraining (default cycle: block i scans direction i mod 4, "
                         "DiM's layout, ~3x the samples/s of the paper's multi on 2 CPU cores)")
    ap.add_argument("--attention-every", type=int, default=1,
                    help="model.attention_every for pretraining (default 1: an attention block after Mamba "
                         "blocks 1-3 of 4, captioning 0.50 vs 0.26 with one block (2); 0 = pure Mamba, whose "
                         "text-to-image ignored the caption: benchmarks/demo_results.md)")
    ap.add_argument("--config", default="configs/tiny.yaml")
    ap.add_argument("--vae-config", default="configs/vae_tiny.yaml")
    ap.add_argument("--nproc", type=int, default=2,
                    help="processes of the VAE stage (data parallel) and of pretraining (default 2 = sequence parallel 2)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dtype", choices=("auto", "float32", "bfloat16"), default="auto",
                    help="pretraining's compute dtype, train.dtype (default auto: bfloat16 autocast with fp32 "
                         "weights where the CPU has native bf16 (AVX512-BF16 / AMX), else float32)")
    args = ap.parse_args(argv)
    if args.dtype == "auto":
        from mdm_dist.train.precision import cpu_has_native_bf16

        args.dtype = "bfloat16" if cpu_has_native_bf16() else "float32"
    if args.steps is None and not args.quick and args.dtype == "bfloat16":
        args.steps = BF16_STEPS  # the time bf16 saves goes into more steps
    defaults = {"num_samples": 4000, "num_eval": 100}
    for key in ("num_samples", "num_eval", "vae_steps", "steps", "sample_steps"):
        if getattr(args, key) is None:
            setattr(args, key, QUICK[key] if args.quick else defaults.get(key))
        if getattr(args, key) is not None and getattr(args, key) <= 0:
            ap.error(f"--{key.replace('_', '-')} must be > 0")
    if args.best_of < 1:
        ap.error("--best-of must be >= 1 (1 = plain sampling)")
    if args.attention_every < 0:
        ap.error("--attention-every must be >= 0 (0 = pure Mamba)")
    if not args.time_budget >= 0:
        ap.error("--time-budget must be >= 0 seconds (0 = no budget)")
    return args


# ----------------------------------------------------------------------------------------------
# Stages: (name, the file whose existence means done, the command, extra environment)
# ----------------------------------------------------------------------------------------------


def pretrain_budget(args, spent_s: float) -> float:
    """``train.time_budget_s`` of pretraining when the demo has spent ``spent_s`` seconds before it
    (0 = no budget)."""
    if not args.time_budget:
        return 0.0
    return round(max(args.time_budget - spent_s - RESERVE_S, MIN_PRETRAIN_SHARE * args.time_budget), 1)


def stage_commands(args, out: Path, spent_s: float = 0.0) -> list[tuple[str, Path, list[str] | None, dict]]:
    """The stages; ``spent_s``: the seconds already spent when pretraining starts (its budget)."""
    corpus, tok, vae, mds, run = out / "corpus", out / "tokenizer", out / "vae", out / "mds", out / "run"
    # --quick: 32-sample steps (its corpus holds 256 images; configs/tiny.yaml's steps take 256)
    quick_sets = (["--set", "train.save_every=0", "--set", "train.log_every=1", "--set", "train.global_batch_size=32",
                   "--set", "train.micro_batch_size=32"] if args.quick else [])
    vae_sets = ["--set", f"train.max_steps={args.vae_steps}"] if args.vae_steps else []
    if args.vae_optimizer:
        vae_sets += ["--set", f"train.optimizer={args.vae_optimizer}"]
    mdm_sets = ["--set", f"train.max_steps={args.steps}"] if args.steps else []
    if args.time_budget:
        vae_sets += ["--set", f"train.time_budget_s={round(VAE_SHARE * args.time_budget, 1)}"]
        mdm_sets += ["--set", f"train.time_budget_s={pretrain_budget(args, spent_s)}"]
    sample_flags = ((["--steps", str(args.sample_steps)] if args.sample_steps else [])
                    + (["--guidance", str(args.guidance)] if args.guidance is not None else [])
                    + (["--caption-guidance", str(args.caption_guidance)] if args.caption_guidance is not None else [])
                    + ["--best-of", str(args.best_of)])
    def launcher() -> list[str]:  # a free port each: two demos (or a demo and a test) may run side by side
        if args.nproc > 1:
            return [str(Path(PY).parent / "deepspeed"), "--num_accelerators", str(args.nproc),
                    "--master_port", str(free_port())]
        return [PY]
    return [
        ("corpus", corpus / "manifest.json",
         [PY, "data_prep/make_demo_data.py", "--output", str(corpus), "--num-samples", str(args.num_samples),
          "--num-eval", str(args.num_eval), "--seed", str(args.seed)], ONE),
        ("tokenizer", tok / "tokenizer.model",
         [PY, "data_prep/train_tokenizer.py", "--input", str(corpus), "--output", str(tok)], ONE),
        ("vae", vae / "vae.pt",
         [*launcher(), "launch/train_vae.py", "--config", args.vae_config, "--data", str(corpus), "--output", str(vae),
          "--tokenizer", str(tok), *vae_sets], ONE),
        ("encode", mds / "index.json",
         [PY, "data_prep/encode_laion.py", "--input", str(corpus), "--output", str(mds), "--vae",
          str(vae / "vae.pt"), "--tokenizer", str(tok)], ONE),
        ("pretrain", run / "export" / "model.safetensors",
         [*launcher(), "launch/pretrain.py", "--config", args.config, "--data", str(mds), "--run-dir", str(run),
          "--resume", "auto", "--set", f"parallel.sequence_parallel={args.nproc}",
          "--set", f"data.tokenizer={tok.resolve()}",
          "--set", f"train.vae_checkpoint={(vae / 'vae.pt').resolve()}",
          "--set", f"train.seed={args.seed}", "--set", "train.sample_every=0", "--set", f"train.dtype={args.dtype}",
          "--set", f"model.scan_mode={args.scan_mode}", "--set", f"model.attention_every={args.attention_every}",
          "--set", f"data.num_workers={LOADER_WORKERS}", *mdm_sets, *quick_sets],
         ONE),
        ("evaluate", out / "quality.json",
         [PY, "-m", "mdm_dist.eval.heldout", "--export", str(run / "export"), "--vae", str(vae / "vae.pt"),
          "--tokenizer", str(tok), "--corpus", str(corpus), "--out", str(out), "--num", str(args.num_eval),
          "--weights", args.weights, "--seed", str(args.seed), "--data", str(mds), *sample_flags], BOTH_CORES),
        ("report", out / "demo_report.json", None, {}),
    ]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def clear(done: Path, out: Path) -> None:
    """Remove a stage's previous output: its folder (a stage folder under ``out``) or its file."""
    if done.parent != out:
        stage_dir = out / done.relative_to(out).parts[0]
        shutil.rmtree(stage_dir, ignore_errors=True)
    else:
        done.unlink(missing_ok=True)


def shell_line(cmd: list[str], env: dict) -> str:
    return " ".join([f"{k}={v}" for k, v in env.items()] + [shlex.quote(c) for c in cmd])


def run_stage(name: str, cmd: list[str], env: dict, log: Path) -> None:
    """Run one stage's command with its output on the console and in ``log``; fail loudly."""
    full_env = {**os.environ, **env}
    full_env.setdefault("DS_ACCELERATOR", "cpu")
    full_env.setdefault("PYTHONUNBUFFERED", "1")
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, cwd=REPO, env=full_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, bufsize=1)
        for line in proc.stdout:
            sys.stdout.write(line)
            f.write(line)
        code = proc.wait()
    if code != 0:
        raise SystemExit(f"demo: stage '{name}' failed (exit {code}); its output is in {log}. "
                         f"Rerun it alone with:\n  {shell_line(cmd, env)}")


# ----------------------------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------------------------


def read_metrics(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def loss_history(records: list[dict]) -> dict[str, list[float]]:
    """Every loss term of metrics.jsonl over steps (``loss`` = total); absent terms left out.
    A step where a term is null (non-finite) repeats the previous value so the curve stays drawn."""
    keys = ["loss", "se_txt", "se_img", "rec_txt", "rec_img", "kl", "align"]
    hist: dict[str, list[float]] = {}
    for k in keys:
        vals, last = [], None
        for r in records:
            v = r.get(k)
            last = float(v) if v is not None else last
            if last is not None:
                vals.append(last)
        if vals:
            hist["total" if k == "loss" else k] = vals
    return hist


def _plan_counts(plans: list[dict] | None) -> list[list[int]] | None:
    """A training stage's time-budget plans as [step decided at, step count] pairs (None: no budget)."""
    return [[int(p["step"]), int(p["max_steps"])] for p in plans] if plans else None


def write_report(args, out: Path, timings: dict) -> dict:
    from mdm_dist.viz import loss_curves

    run = out / "run"
    metrics = read_metrics(run / "metrics.jsonl")
    hist = loss_history(metrics)
    if hist:
        loss_curves(hist, out / "loss_curves.png", smooth=max(1, min(10, len(metrics) // 5)))
    if (out / "vae" / "vae_reconstructions.png").is_file():
        shutil.copyfile(out / "vae" / "vae_reconstructions.png", out / "vae_reconstructions.png")
    quality = json.loads((out / "quality.json").read_text())
    vae_metrics = json.loads((out / "vae" / "vae_metrics.json").read_text())
    encode = json.loads((out / "mds" / "encode_report.json").read_text()) if (out / "mds" / "encode_report.json").is_file() else {}
    total = sum(t["seconds"] for t in timings.values())
    steps = [r for r in metrics if r.get("step_time_s") is not None]
    budget = json.loads((run / "budget.json").read_text()) if (run / "budget.json").is_file() else {}
    run_train = {}
    if (run / "config.yaml").is_file():
        import yaml

        run_train = (yaml.safe_load((run / "config.yaml").read_text()) or {}).get("train", {})
    report = {
        "command": "python launch/demo.py " + " ".join(shlex.quote(a) for a in sys.argv[1:]),
        "quick": args.quick,
        "dtype": args.dtype,
        "stage_timings_s": {k: round(v["seconds"], 2) for k, v in timings.items()},
        "stages": timings,
        "total_wall_s": round(total, 2),
        "quality": {k: quality.get(k) for k in ("text_to_image", "captioning", "text_to_image_colour",
                                                "text_to_image_shape", "text_to_image_plain", "captioning_colour",
                                                "captioning_shape", "captioning_exact", "classifier_on_real",
                                                "classifier_on_vae_reconstructions", "num_prompts",
                                                "spec_seen_in_train")},
        # loss with shuffled / true conditions on 128 training samples (1.00 = condition ignored)
        "condition_reliance": quality.get("condition_reliance"),
        "sampling": {k: quality.get(k) for k in ("sampler", "sample_steps", "guidance_scale", "best_of",
                                                "caption_guidance_scale", "weights", "timings")},
        "targets": TARGETS,
        "met": {
            "text_to_image": quality["text_to_image"] >= TARGETS["text_to_image"],
            "captioning": quality["captioning"] >= TARGETS["captioning"],
            "total_wall_s": total <= TARGETS["total_wall_s"],
        },
        "time_budget_s": args.time_budget or None,
        "vae": {**{k: vae_metrics["metrics"].get(k) for k in ("psnr", "token_acc", "caption_token_acc")},
                **{k: vae_metrics.get(k) for k in ("steps", "configured_steps", "time_budget_s")},
                "budget_plans": _plan_counts(vae_metrics.get("budget_plans"))},
        "encode": {k: encode.get(k) for k in ("seen", "written", "skipped")},
        "pretrain": {
            "steps": len(metrics),
            "configured_steps": run_train.get("max_steps"),
            "time_budget_s": run_train.get("time_budget_s"),
            "budget_plans": _plan_counts(budget.get("plans")),
            "first_loss": metrics[0].get("loss") if metrics else None,
            "last_loss": metrics[-1].get("loss") if metrics else None,
            "mean_step_time_s": sum(r["step_time_s"] for r in steps) / len(steps) if steps else None,
            "mean_samples_per_s": sum(r["samples_per_s"] for r in steps) / len(steps) if steps else None,
            "skipped_steps": sum(bool(r.get("skipped")) for r in metrics),
            "processes": args.nproc,
        },
        "artifacts": [p for p in ("text_to_image.png", "image_to_text.png", "vae_reconstructions.png",
                                  "captions.json", "captions.md", "loss_curves.png", "demo_report.json")
                      if p == "demo_report.json" or (out / p).is_file()],
    }
    report["met"]["all"] = all(report["met"].values())
    (out / "demo_report.json").write_text(json.dumps(report, indent=2) + "\n")
    return report


# ----------------------------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------------------------


def main(argv=None) -> int:
    args = parse_args(argv)
    out = Path(args.output)
    if not out.is_absolute():
        out = REPO / out
    stages = stage_commands(args, out)
    if args.print_commands:
        print(f"# the demo's stages; run from {REPO}")
        if args.time_budget:
            print(f"# pretrain's train.time_budget_s below assumes the stages before it took no time; the demo "
                  f"passes what is left of --time-budget {args.time_budget:g} s when it starts, less {RESERVE_S:g} s")
        for name, _, cmd, env in stages:
            print(f"# {name}\n{shell_line(cmd, env)}" if cmd else f"# {name}: written by launch/demo.py itself")
        return 0
    out.mkdir(parents=True, exist_ok=True)
    (out / "logs").mkdir(exist_ok=True)
    timing_file = out / "stage_timings.json"
    timings = json.loads(timing_file.read_text()) if timing_file.is_file() else {}
    forced = min((STAGES.index(s) for s in args.force), default=len(STAGES))
    start = time.time()
    for i, (name, done, cmd, env) in enumerate(stages):
        if done.exists() and i < forced:
            took = f"; took {timings[name]['seconds']:.1f} s when it ran" if name in timings else ""
            print(f"\n=== [{i + 1}/{len(stages)}] {name}: skipped ({done.relative_to(out)} exists{took})", flush=True)
            timings.setdefault(name, {"seconds": 0.0})["skipped_now"] = True
            continue
        if i >= forced or name in ("evaluate", "report"):
            clear(done, out)  # a rerun starts clean (an unfinished stage resumes instead)
        forced = min(forced, i)  # a stage that runs makes every later stage's output stale
        if name == "pretrain":  # its budget: what the stages before it left of --time-budget
            spent = sum(t["seconds"] for k, t in timings.items() if STAGES.index(k) < i)
            name, done, cmd, env = stage_commands(args, out, spent_s=spent)[i]
            print(f"\n=== pretrain time budget: {pretrain_budget(args, spent):.0f} s of the training loop "
                  f"({spent:.0f} s spent before it, {RESERVE_S:.0f} s kept for start-up, evaluation and report)"
                  if args.time_budget else "\n=== no time budget (--time-budget 0)", flush=True)
        print(f"\n=== [{i + 1}/{len(stages)}] {name}" + (f": {shell_line(cmd, env)}" if cmd else ""), flush=True)
        t0 = time.time()
        if name == "report":
            timings[name] = {"seconds": 0.0}
            write_report(args, out, timings)
        else:
            run_stage(name, cmd, env, out / "logs" / f"{name}.log")
        timings[name] = {"seconds": round(time.time() - t0, 2), "skipped_now": False,
                         "command": shell_line(cmd, env) if cmd else None}
        timing_file.write_text(json.dumps(timings, indent=1) + "\n")
        print(f"=== {name}: done in {timings[name]['seconds']:.1f} s (elapsed {time.time() - start:.0f} s)", flush=True)
    report = write_report(args, out, timings)  # final timings, the report stage's own included
    q = report["quality"]
    print(f"\ndemo done in {report['total_wall_s']:.0f} s of stage time (target {TARGETS['total_wall_s']} s): "
          f"text-to-image {q['text_to_image']:.0%} (target {TARGETS['text_to_image']:.0%}), "
          f"captioning {q['captioning']:.0%} (target {TARGETS['captioning']:.0%}); "
          f"classifier on real held-out images {q['classifier_on_real']:.0%}")
    print(f"outputs in {out}: {', '.join(report['artifacts'])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
