"""launch/pretrain.py end to end on a tiny MDS corpus: 2 CPU ranks (gloo) vs one plain process,
exact resume, SIGTERM, the NaN guard, metrics, export + launch/sample.py, CLI errors.

The runs are fresh processes, one per rank with the deepspeed launcher's environment, forked from
a warm interpreter (tests/_warm.py: the imports are paid once, not per run); the command-line
tests run ``python launch/pretrain.py`` itself, and tests/test_demo.py runs it under
``deepspeed --num_accelerators 2``.

Equivalence runs pin ``diffusion.task_probs={joint: 1}`` and ``p_uncond=0``: with mixed tasks the
diffusion terms are means over the *active* samples of each micro-batch, which depends on the
split (see mdm_dist/train/noise.py); every other random draw is keyed by (seed, step, sample key)
and so is the same on any layout.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
import pytest

from _warm import run_script, start_script

REPO = Path(__file__).resolve().parents[1]
PY = sys.executable
PRETRAIN = REPO / "launch" / "pretrain.py"

TINY = [
    "model.d_model=32", "model.headdim=8", "model.d_state=8", "model.chunk_size=8", "model.n_layers=2",
    "vae.image_size=16", "vae.channel_mult=[1,2]", "vae.base_channels=8", "vae.trunk_width=32",
    "vae.vocab_size=40", "vae.max_text_len=6", "vae.d_z=8", "train.global_batch_size=4",
    "train.micro_batch_size=2", "train.warmup_steps=2", "train.log_every=1", "diffusion.sample_steps=2",
    "train.sample_every=0", "train.save_every=0", "train.grad_clip=100.0",
]
EXACT = ['diffusion.task_probs={"joint":1.0}', "diffusion.p_uncond=0.0"]
N_TOKENS, D_Z = 16, 8  # image tokens (16 px / 2 down / patch 2 -> 4 x 4) and latent width of TINY


def write_corpus(out: Path, n: int, nan_keys: tuple[int, ...] = ()) -> Path:
    """An MDS stream in the schema of mdm_dist/data/schema.py with random ids and latents."""
    from streaming import MDSWriter

    from mdm_dist.data.schema import COLUMNS

    rng = np.random.default_rng(0)
    with MDSWriter(out=str(out), columns=COLUMNS, compression=None, size_limit=1 << 16) as w:
        for i in range(n):
            mu = rng.standard_normal((N_TOKENS, D_Z)).astype(np.float16)
            if i in nan_keys:
                mu[0, 0] = np.nan
            w.write({"key": f"s{i:05d}", "caption": f"caption {i}",
                     "ids": rng.integers(2, 40, int(rng.integers(2, 7))).astype(np.int32), "img_mu": mu,
                     "img_logvar": (rng.standard_normal((N_TOKENS, D_Z)) * 0.1 - 2).astype(np.float16),
                     "category": int(rng.integers(0, 4)), "source": "test"})
    return out


def _env(tmp: Path) -> dict:
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu", WANDB_MODE="disabled", PYTHONPATH=str(REPO),
               TORCH_EXTENSIONS_DIR=str(REPO / ".cache" / "torch_extensions"), MDM_STREAMING_TMP=str(tmp / "streaming"))
    return env


def pretrain_args(run_dir: Path, data: Path, overrides: list[str], resume: str | None = None) -> list[str]:
    args = ["--config", str(REPO / "configs" / "tiny.yaml"), "--data", str(data), "--run-dir", str(run_dir)]
    if resume:
        args += ["--resume", resume]
    for o in TINY + overrides:
        args += ["--set", o]
    return args


def run_pretrain(tmp: Path, run_dir: Path, data: Path, overrides: list[str], ranks: int = 1,
                 resume: str | None = None, expect: int = 0) -> subprocess.CompletedProcess:
    p = run_script(PRETRAIN, pretrain_args(run_dir, data, overrides, resume), _env(tmp), REPO, ranks, timeout=300)
    assert p.returncode == expect, f"exit {p.returncode}\n{p.stdout[-3000:]}\n{p.stderr[-5000:]}"
    return p


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def losses(run_dir: Path) -> dict[int, float]:
    return {m["step"]: m["loss"] for m in metrics(run_dir)}


def assert_losses_close(got: dict, ref: dict, steps, what: str, rtol=1e-5) -> None:
    a, b = np.array([got[s] for s in steps]), np.array([ref[s] for s in steps])
    assert np.allclose(a, b, rtol=rtol, atol=1e-6), f"{what}: {a.tolist()} vs {b.tolist()}"


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("pretrain")
    return {"tmp": tmp, "data": write_corpus(tmp / "mds", 64)}


# ----------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------


def test_help_works(work):
    p = subprocess.run([PY, "launch/pretrain.py", "--help"], cwd=REPO, env=_env(work["tmp"]),
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 0 and "--resume" in p.stdout and "--run-dir" in p.stdout and "--set" in p.stdout


def test_bad_set_key_exits_2_with_allowed_keys(work):
    p = subprocess.run([PY, "launch/pretrain.py", "--config", "configs/tiny.yaml", "--data", str(work["data"]),
                        "--set", "train.max_stepz=3"], cwd=REPO, env=_env(work["tmp"]), capture_output=True,
                       text=True, timeout=60)
    assert p.returncode == 2
    assert "unknown key 'train.max_stepz'" in p.stderr and "max_steps" in p.stderr and "global_batch_size" in p.stderr


def test_impossible_sequence_parallel_layout_exits_2(work):
    # 8 heads / sp 3 and a world of 1: the layout check names the key
    p = subprocess.run([PY, "launch/pretrain.py", "--config", "configs/tiny.yaml", "--data", str(work["data"]),
                        "--run-dir", str(work["tmp"] / "badsp"), *sum([["--set", o] for o in TINY], []),
                        "--set", "parallel.sequence_parallel=3"], cwd=REPO, env=_env(work["tmp"]),
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and "sequence_parallel" in p.stderr, p.stderr[-2000:]


# ----------------------------------------------------------------------------------------------
# 2 ranks == 1 rank; resume == uninterrupted; export + sample
# ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def reference(work):
    """One plain process, 4 steps (global batch 4 = micro 2 x accumulation 2)."""
    run = work["tmp"] / "one_rank"
    run_pretrain(work["tmp"], run, work["data"], EXACT + ["train.max_steps=4"])
    return run


def test_zero3_two_ranks_match_one_rank_and_resume_is_exact(work, reference):
    tmp = work["tmp"]
    # partition every parameter (the generated config's CPU default too, stated here so the test
    # does not rest on it), and a key the generated config does not set, to see the merge reach the run
    ds_json = tmp / "ds_user.json"
    ds_json.write_text(json.dumps({"zero_optimization": {"stage3_param_persistence_threshold": 0,
                                                         "stage3_max_reuse_distance": 123456789}}))
    common = EXACT + ["train.max_steps=4", "parallel.zero_stage=3", f"parallel.deepspeed_config={ds_json}"]
    two = tmp / "two_ranks"
    run_pretrain(tmp, two, work["data"], common + ["train.save_every=2"], ranks=2)
    ref = losses(reference)
    assert_losses_close(losses(two), ref, [1, 2, 3, 4], "ZeRO-3 dp=2 vs one process")
    zero = json.loads((two / "ds_config.json").read_text())["zero_optimization"]
    assert zero["stage3_param_persistence_threshold"] == 0 and zero["stage3_max_reuse_distance"] == 123456789

    # the EMA (kept on ZeRO-3 partitions) and the raw weights, exported, match the one-process run
    from safetensors.torch import load_file

    for name in ("model.safetensors", "model_ema.safetensors"):
        a, b = load_file(str(reference / "export" / name)), load_file(str(two / "export" / name))
        assert a.keys() == b.keys()
        worst = max(float((a[k] - b[k]).abs().max()) for k in a)
        assert worst < 1e-5, f"{name}: max difference {worst}"

    # a run stopped after step 2 (its checkpoint) and resumed reproduces steps 3-4, data position included
    resumed = tmp / "resumed"
    p = run_pretrain(tmp, resumed, work["data"], common, ranks=2, resume=str(two / "checkpoints" / "step_00000002"))
    assert "resumed from" in p.stdout and "at step 2" in p.stdout
    got = losses(resumed)
    assert sorted(got) == [3, 4]
    assert_losses_close(got, losses(two), [3, 4], "resumed vs uninterrupted", rtol=1e-6)


def test_muon_two_ranks_match_one_rank_and_resume_is_exact(work):
    """train.optimizer=muon through the trainer: ZeRO-3 on 2 ranks takes the steps of one process
    (whose 2 micro-batches accumulate before Muon orthogonalizes), and a resume from step 2 restores
    the Muon momentum with the rest (steps 3-4 as uninterrupted)."""
    tmp = work["tmp"]
    common = EXACT + ["train.max_steps=4", "parallel.zero_stage=3", "train.optimizer=muon", "train.muon_lr=0.05"]
    one, two, resumed = tmp / "muon_one", tmp / "muon_two", tmp / "muon_resumed"
    run_pretrain(tmp, one, work["data"], common)
    run_pretrain(tmp, two, work["data"], common + ["train.save_every=2"], ranks=2)
    assert json.loads((two / "ds_config.json").read_text())["gradient_clipping"] == 0.0
    assert_losses_close(losses(two), losses(one), [1, 2, 3, 4], "Muon, ZeRO-3 dp=2 vs one process")
    p = run_pretrain(tmp, resumed, work["data"], common, ranks=2, resume=str(two / "checkpoints" / "step_00000002"))
    assert "at step 2" in p.stdout and sorted(losses(resumed)) == [3, 4]
    assert_losses_close(losses(resumed), losses(two), [3, 4], "Muon: resumed vs uninterrupted", rtol=1e-6)


def test_sequence_parallel_2_matches_one_rank(work, reference):
    tmp = work["tmp"]
    sp = tmp / "sp2"
    run_pretrain(tmp, sp, work["data"], EXACT + ["train.max_steps=4", "parallel.sequence_parallel=2",
                                                 "train.activation_checkpointing=every"], ranks=2)
    assert_losses_close(losses(sp), losses(reference), [1, 2, 3, 4], "SP=2 (+ checkpointing) vs one process")


def test_metrics_jsonl_has_required_keys(reference):
    rows = metrics(reference)
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    required = {"step", "loss", "rec_txt", "kl", "se_txt", "se_img", "lr", "grad_norm", "samples_per_s",
                "tokens_per_s", "mfu", "mem_gb"}
    for r in rows:
        assert required <= r.keys(), required - r.keys()
        assert r["mfu"] is None  # CPU: no known peak
        assert r["samples_per_s"] > 0 and r["tokens_per_s"] > r["samples_per_s"] and r["mem_gb"] > 0
    from mdm_dist.config import load_config

    lr = load_config(REPO / "configs" / "tiny.yaml").train.lr
    assert rows[0]["lr"] == pytest.approx(lr * 1 / 2)  # warmup 2 steps to train.lr
    cfg_text = (reference / "config.yaml").read_text()
    assert "max_steps: 4" in cfg_text and str(reference.parent / "mds") in cfg_text


def test_export_and_sample_script(work, reference):
    out = work["tmp"] / "sampled"
    for ckpt, weights in ((reference / "export", "ema"), (reference / "checkpoints", "raw")):
        p = run_script(REPO / "launch" / "sample.py", ["--checkpoint", str(ckpt), "--weights", weights, "--num", "2",
                                                      "--steps", "2", "--out", str(out / weights)],
                       _env(work["tmp"]), REPO, timeout=120)
        assert p.returncode == 0, p.stderr[-3000:]
        for f in ("joint.png", "t2i.png", "i2t.png", "captions.json", "captions.md"):
            assert (out / weights / f).stat().st_size > 0
        rows = json.loads((out / weights / "captions.json").read_text())
        assert {r["mode"] for r in rows} == {"joint", "t2i", "i2t"}


# ----------------------------------------------------------------------------------------------
# Time budget (train.time_budget_s, mdm_dist/train/budget.py)
# ----------------------------------------------------------------------------------------------


def test_time_budget_sets_the_step_count_and_the_schedule_and_resume_keeps_it(work):
    """A budget of seconds for 100000 steps: the run chooses its count after step 20 (inside the
    20-step warmup, so the whole schedule is that of a run configured with that count), may re-plan
    it later, and trains with the learning rate of the plan in force at every step. A resume from the
    checkpoint it ends with, under another budget, keeps the count. (The arithmetic, the ranks'
    agreement and the guard: tests/test_train_budget.py; the guard in a 2-rank run:
    tests/test_data_vae_stage.py.)"""
    import re

    from mdm_dist.config import load_config
    from mdm_dist.train.schedule import lr_at

    tmp = work["tmp"]
    run = tmp / "budget"
    args = ["train.max_steps=100000", "train.warmup_steps=20", "train.log_every=1000"]
    p = run_pretrain(tmp, run, work["data"], args + ["train.time_budget_s=15"])
    m = re.search(r"(\d+) of the configured 100000 steps fit", p.stdout)
    assert m, p.stdout[-3000:]
    assert 20 <= int(m.group(1)) < 100000
    rows = metrics(run)
    state = torch.load(run / "checkpoints" / f"step_{len(rows):08d}" / "trainer_rank00000.pt", weights_only=False)
    budget = state["extra"]["budget"]
    planned, plans = budget["planned"], budget["plans"]
    assert budget["elapsed_s"] > 0 and plans[0] == {**plans[0], "step": 20, "max_steps": int(m.group(1))}
    # later re-plans (at 50% and 80% of the budget) are printed and recorded with their anchors
    assert len(plans) == 1 + p.stdout.count("re-planned at step") and plans[-1]["max_steps"] == planned
    written = json.loads((run / "budget.json").read_text())  # rank 0 writes them at the end too
    assert [(q["step"], q["max_steps"]) for q in written["plans"]] == [(q["step"], q["max_steps"]) for q in plans]
    # the guard stops the run early only if the machine slowed down after the last plan
    assert len(rows) == planned or "time budget of 15 s spent" in p.stdout
    t = load_config(REPO / "configs" / "tiny.yaml").train
    for r in rows:  # each step's rate is the schedule of the plan in force when it ran
        s = r["step"] - 1
        plan = [q for q in plans if q["step"] <= s][-1] if s >= 20 else plans[0]
        anchor = None if plan["anchor"] is None else tuple(plan["anchor"])
        assert r["lr"] == pytest.approx(lr_at(s, t.lr, t.min_lr, 20, plan["max_steps"], anchor), rel=1e-9)

    # resumed under a larger budget: the same count (nothing left to train, or the guard's rest)
    p = run_pretrain(tmp, run, work["data"], args + ["train.time_budget_s=1000"], resume="auto")
    assert f"at step {len(rows)}" in p.stdout and f"done: {planned} steps" in p.stdout
    assert [r["step"] for r in metrics(run)] == list(range(1, planned + 1))


# ----------------------------------------------------------------------------------------------
# SIGTERM, NaN guard
# ----------------------------------------------------------------------------------------------


def _start_until_steps(tmp, run, data, args, n, ranks=1):
    """Start a pretraining run in the background and return once it has logged ``n`` steps
    (or after 120 s); the caller signals and reaps the process."""
    proc = start_script(PRETRAIN, pretrain_args(run, data, args), _env(tmp), REPO, ranks)
    deadline = time.time() + 120
    while time.time() < deadline:
        if (run / "metrics.jsonl").is_file() and len((run / "metrics.jsonl").read_text().splitlines()) >= n:
            break
        time.sleep(0.05)
    return proc


def test_sigterm_saves_exits_0_and_resume_matches_uninterrupted(work):
    tmp, steps = work["tmp"], 24
    args = ["train.max_steps=%d" % steps, "train.sample_every=0"]
    full = tmp / "uninterrupted"
    run_pretrain(tmp, full, work["data"], args)

    run = tmp / "preempted"
    proc = _start_until_steps(tmp, run, work["data"], args, 3)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-3000:]
    assert "pre-empted" in out
    k = len(metrics(run))
    assert k < steps and (run / "checkpoints" / "latest").read_text().strip() == f"step_{k:08d}"

    p = run_pretrain(tmp, run, work["data"], args, resume="auto")
    assert f"at step {k}" in p.stdout
    got = losses(run)
    assert sorted(got) == list(range(1, steps + 1))
    # 24 steps x 4 samples = 1.5 epochs of the 64-sample corpus: the resume crosses an epoch boundary
    assert_losses_close(got, losses(full), range(1, steps + 1), f"SIGTERM at step {k} + resume vs uninterrupted",
                        rtol=1e-6)


def test_nan_batch_is_skipped_and_counted(work):
    tmp = work["tmp"]
    data = write_corpus(tmp / "mds_one_nan", 64, nan_keys=(5,))
    run = tmp / "one_nan"
    run_pretrain(tmp, run, data, ["train.max_steps=16", "train.max_bad_steps=2"])  # 16 x 4 = one epoch
    rows = metrics(run)
    bad = [r for r in rows if r["skipped"]]
    assert len(bad) == 1 and bad[0]["loss"] is None and bad[0]["skip_reason"] == "non-finite loss"
    assert rows[-1]["bad_steps"] == 1 and all(r["loss"] is not None for r in rows if not r["skipped"])
    from safetensors.torch import load_file

    weights = load_file(str(run / "export" / "model_ema.safetensors"))
    assert all(bool(t.isfinite().all()) for t in weights.values())


def test_nan_guard_stops_after_max_bad_steps(work):
    tmp = work["tmp"]
    data = write_corpus(tmp / "mds_all_nan", 32, nan_keys=tuple(range(32)))
    run = tmp / "all_nan"
    p = run_pretrain(tmp, run, data, ["train.max_steps=10", "train.max_bad_steps=3"], expect=3)
    assert "3 non-finite steps in a row" in p.stderr and "train.max_bad_steps = 3" in p.stderr
    rows = metrics(run)
    assert [r["bad_streak"] for r in rows] == [1, 2, 3] and all(r["skipped"] for r in rows)


def test_sigterm_to_one_of_two_ranks_stops_both_at_the_same_step(work):
    """Pre-emption reaches one rank only: the flag is all-reduced, both ranks save the same step."""
    tmp, steps = work["tmp"], 12
    args = ["train.max_steps=%d" % steps]
    run = tmp / "preempted_two"
    proc = _start_until_steps(tmp, run, work["data"], args, 2, ranks=2)
    proc.send_signal(signal.SIGTERM, rank=1)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-3000:]
    tag = (run / "checkpoints" / "latest").read_text().strip()
    assert {f.name for f in (run / "checkpoints" / tag).glob("trainer_rank*.pt")} == {"trainer_rank00000.pt",
                                                                                    "trainer_rank00001.pt"}
    k = len(metrics(run))
    assert tag == f"step_{k:08d}" and k < steps  # (resume: test_sigterm_saves_exits_0_and_resume_...)


def test_vae_stage_checkpoint_initializes_and_image_path_stays_frozen(work):
    """train.vae_checkpoint: the MDM's VAE starts from the VAE stage's weights (also partitioned
    under ZeRO-3 on 2 ranks); the image path and the shared trunk stay exactly those weights,
    the text stems train; a checkpoint of another vae section is refused with exit 2."""
    from safetensors.torch import load_file

    from mdm_dist.config import load_config
    from mdm_dist.data.vae_checkpoint import save_vae_checkpoint
    from mdm_dist.models.vae import UnifiedVAE

    tmp = work["tmp"]
    cfg = load_config(REPO / "configs" / "tiny.yaml", TINY)
    torch.manual_seed(123)
    stage = UnifiedVAE(cfg.vae)
    ckpt = save_vae_checkpoint(tmp / "stage_vae.pt", stage, cfg, tmp, step=1)
    run = tmp / "vae_init"
    run_pretrain(tmp, run, work["data"], ["train.max_steps=3", f"train.vae_checkpoint={ckpt}"], ranks=2)
    exported = load_file(str(run / "export" / "model.safetensors"))
    frozen = ("image_encoder.", "image_in.", "image_out.", "image_decoder.", "trunk_enc.", "trunk_dec.", "modality_emb")
    moved = []
    for name, value in stage.state_dict().items():
        got = exported[f"vae.{name}"]
        if name.startswith(frozen):
            assert torch.equal(got, value), f"vae.{name} changed but is frozen in pretraining"
        elif not torch.equal(got, value):
            moved.append(name)
    assert {n.split(".")[0] for n in moved} == {"tok_emb", "pos_emb", "text_head"}
    other = load_config(REPO / "configs" / "tiny.yaml", TINY + ["vae.beta_kl=0.5"])
    bad = save_vae_checkpoint(tmp / "other_vae.pt", UnifiedVAE(other.vae), other, tmp, step=1)
    p = run_pretrain(tmp, tmp / "vae_bad", work["data"], ["train.max_steps=1", f"train.vae_checkpoint={bad}"],
                     expect=2)
    assert "differs in: vae.beta_kl" in p.stderr
