"""launch/demo.py end to end, shortened (--quick: small corpus, a few steps of each stage), on 2
CPU processes under the deepspeed launcher: every artifact exists and is valid, and a rerun
skips every stage."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
STAGES = ("corpus", "tokenizer", "vae", "encode", "pretrain", "evaluate", "report")


def _env(tmp: Path) -> dict:
    cache = ROOT / ".cache"
    return {**os.environ, "TORCH_EXTENSIONS_DIR": str(cache / "torch_extensions"), "WANDB_MODE": "disabled",
            "MPLCONFIGDIR": str(cache / "matplotlib"), "TRITON_CACHE_DIR": str(cache / "triton"),
            "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def _demo(out: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "launch/demo.py", "--quick", "--output", str(out), *extra], cwd=ROOT,
                          env=_env(out), capture_output=True, text=True, timeout=900)


def test_print_commands_lists_every_stage(tmp_path):
    p = _demo(tmp_path / "demo", "--print-commands")
    assert p.returncode == 0, p.stderr
    text = p.stdout
    for needle in ("data_prep/make_demo_data.py", "data_prep/train_tokenizer.py", "launch/train_vae.py",
                   "data_prep/encode_laion.py", "deepspeed --num_accelerators 2 ", "launch/pretrain.py",
                   "parallel.sequence_parallel=2", "train.vae_checkpoint=", "OMP_NUM_THREADS=1",
                   "mdm_dist.eval.heldout"):
        assert needle in text, needle
    assert not (tmp_path / "demo").exists()  # printing runs nothing
    evaluate = next(line for line in text.splitlines() if "mdm_dist.eval.heldout" in line)
    assert "OMP_NUM_THREADS=2" in evaluate  # alone on the machine: both cores
    pretrain = next(line for line in text.splitlines() if "launch/pretrain.py" in line)
    assert "model.attention_every=1" in pretrain and "model.scan_mode=cycle" in pretrain
    assert "data.num_workers=1" in pretrain  # a loader process per rank (LOADER_WORKERS)
    p = _demo(tmp_path / "demo", "--print-commands", "--attention-every", "0", "--caption-guidance", "1.5")
    assert "model.attention_every=0" in p.stdout and "--caption-guidance 1.5" in p.stdout
    bad = _demo(tmp_path / "demo", "--print-commands", "--attention-every", "-1")
    assert bad.returncode == 2 and "--attention-every must be >= 0" in bad.stderr
    p = _demo(tmp_path / "demo", "--print-commands", "--best-of", "3")
    evaluate = next(line for line in p.stdout.splitlines() if "mdm_dist.eval.heldout" in line)
    assert "--best-of 3" in evaluate
    bad = _demo(tmp_path / "demo", "--print-commands", "--best-of", "0")
    assert bad.returncode == 2 and "--best-of must be >= 1" in bad.stderr


def _demo_module():
    import importlib.util

    spec = importlib.util.spec_from_file_location("demo_launch", ROOT / "launch" / "demo.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_dtype_auto_follows_the_cpu_and_bf16_buys_steps(monkeypatch):
    """--dtype auto: bfloat16 where the CPU has native bf16, else float32; bf16 without --steps
    trains BF16_STEPS (the time it saves), an explicit --steps or --quick wins."""
    import mdm_dist.train.precision as precision

    demo = _demo_module()
    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: True)
    a = demo.parse_args([])
    assert (a.dtype, a.steps) == ("bfloat16", demo.BF16_STEPS)
    assert demo.parse_args(["--steps", "100"]).steps == 100
    assert demo.parse_args(["--quick"]).steps == demo.QUICK["steps"]
    assert (demo.parse_args(["--dtype", "float32"]).dtype, demo.parse_args(["--dtype", "float32"]).steps) == ("float32", None)
    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: False)
    a = demo.parse_args([])
    assert (a.dtype, a.steps) == ("float32", None)  # the config's train.max_steps
    assert demo.parse_args(["--dtype", "bfloat16"]).steps == demo.BF16_STEPS
    cmds = {name: cmd for name, _, cmd, _ in demo.stage_commands(demo.parse_args(["--dtype", "bfloat16"]), ROOT / "x")}
    assert "train.dtype=bfloat16" in cmds["pretrain"] and f"train.max_steps={demo.BF16_STEPS}" in cmds["pretrain"]


def test_time_budget_splits_the_20_minutes_between_the_training_stages():
    """--time-budget (default the 20-minute target): the VAE stage gets VAE_SHARE of it, pretraining
    what the stages before it left less RESERVE_S, at least MIN_PRETRAIN_SHARE; 0 = no budgets."""
    demo = _demo_module()
    a = demo.parse_args([])
    assert a.time_budget == 1200 == demo.TARGETS["total_wall_s"]
    # hand-computed: 1200 - 250 s spent - 125 s reserve = 825 s; 0.2 x 1200 = 240 s for the VAE
    assert (demo.RESERVE_S, demo.VAE_SHARE, demo.MIN_PRETRAIN_SHARE) == (125.0, 0.2, 0.25)
    assert demo.pretrain_budget(a, 250.0) == 825.0
    assert demo.pretrain_budget(a, 1100.0) == 300.0  # the floor: 0.25 x 1200
    cmds = {name: cmd for name, _, cmd, _ in demo.stage_commands(a, ROOT / "x", spent_s=250.0)}
    assert "train.time_budget_s=240.0" in cmds["vae"] and "train.time_budget_s=825.0" in cmds["pretrain"]
    off = demo.parse_args(["--time-budget", "0"])
    assert demo.pretrain_budget(off, 250.0) == 0.0
    cmds = {name: cmd for name, _, cmd, _ in demo.stage_commands(off, ROOT / "x")}
    assert not any("time_budget" in c for c in cmds["vae"] + cmds["pretrain"])
    with pytest.raises(SystemExit):
        demo.parse_args(["--time-budget", "-5"])


def test_vae_optimizer_reaches_only_the_vae_stage():
    """--vae-optimizer sets the VAE stage's train.optimizer (default: the config's); pretraining's
    optimizer stays configs/tiny.yaml's."""
    demo = _demo_module()
    cmds = {name: cmd for name, _, cmd, _ in demo.stage_commands(demo.parse_args([]), ROOT / "x")}
    assert not any("train.optimizer" in c for c in cmds["vae"] + cmds["pretrain"])
    args = demo.parse_args(["--vae-optimizer", "muon", "--vae-steps", "1870", "--steps", "2000", "--time-budget", "0"])
    cmds = {name: cmd for name, _, cmd, _ in demo.stage_commands(args, ROOT / "x")}
    assert "train.optimizer=muon" in cmds["vae"] and "train.max_steps=1870" in cmds["vae"]
    assert not any("train.optimizer" in c for c in cmds["pretrain"]) and "train.max_steps=2000" in cmds["pretrain"]
    with pytest.raises(SystemExit):
        demo.parse_args(["--vae-optimizer", "sgd"])


def test_report_lists_the_budget_plans():
    demo = _demo_module()
    plans = [{"step": 20, "max_steps": 387, "anchor": None}, {"step": 180, "max_steps": 355, "anchor": [180, 0.4]}]
    assert demo._plan_counts(plans) == [[20, 387], [180, 355]]
    assert demo._plan_counts([]) is None and demo._plan_counts(None) is None


def test_cpu_has_native_bf16_reads_the_cpu_flags(tmp_path):
    from mdm_dist.train.precision import cpu_has_native_bf16

    f = tmp_path / "cpuinfo"
    f.write_text("processor\t: 0\nflags\t\t: fpu avx2 avx512f avx512bw\n")
    assert not cpu_has_native_bf16(str(f))
    for flag in ("avx512_bf16", "amx_bf16"):
        f.write_text(f"processor\t: 0\nflags\t\t: fpu avx512f {flag} avx512_vnni\n")
        assert cpu_has_native_bf16(str(f))
    assert not cpu_has_native_bf16(str(tmp_path / "missing"))


@pytest.fixture(scope="module")
def quick_demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "out"
    p = _demo(out, "--best-of", "2")  # text-to-image through sample_best_of, end to end
    assert p.returncode == 0, f"demo failed:\n{p.stdout[-4000:]}\n{p.stderr[-4000:]}"
    return out, p.stdout


def test_quick_demo_writes_every_artifact(quick_demo):
    out, stdout = quick_demo
    for stage in STAGES:
        assert f"] {stage}" in stdout, f"no progress line for stage {stage}"
    for name in ("text_to_image.png", "image_to_text.png", "vae_reconstructions.png", "loss_curves.png"):
        with Image.open(out / name) as im:
            im.load()  # decodes the whole PNG
            assert im.size[0] > 100 and im.size[1] > 100, name
    captions = json.loads((out / "captions.json").read_text())
    assert len(captions) == 16 and {"true", "generated", "names_colour_and_shape"} <= set(captions[0])
    assert (out / "captions.md").read_text().startswith("| #")

    report = json.loads((out / "demo_report.json").read_text())
    assert set(report["stage_timings_s"]) == set(STAGES)
    assert all(v >= 0 for v in report["stage_timings_s"].values())
    assert report["stage_timings_s"]["pretrain"] > 0
    assert report["total_wall_s"] == pytest.approx(sum(report["stage_timings_s"].values()), abs=0.1)
    q = report["quality"]
    for key in ("text_to_image", "captioning", "text_to_image_colour", "text_to_image_shape",
                "captioning_colour", "captioning_shape", "classifier_on_real", "classifier_on_vae_reconstructions"):
        assert 0.0 <= q[key] <= 1.0, key
    assert q["classifier_on_real"] >= 0.9  # the held-out images are re-drawn exactly
    # best of 2: the figure over both candidates of each prompt is plain sampling's, in 1/32 steps
    assert report["sampling"]["best_of"] == 2 and 0.0 <= q["text_to_image_plain"] <= 1.0
    assert (q["text_to_image_plain"] * 32) == pytest.approx(round(q["text_to_image_plain"] * 32))
    cr = report["condition_reliance"]
    assert set(cr) == {"i2t", "t2i"} and all(cr[k]["true"] > 0 and cr[k]["ratio"] > 0 for k in cr)
    assert q["num_prompts"] == 16
    assert report["targets"]["text_to_image"] == 0.8 and report["targets"]["captioning"] == 0.8
    assert set(report["met"]) == {"text_to_image", "captioning", "total_wall_s", "all"}
    assert report["pretrain"]["steps"] == 6 and report["pretrain"]["processes"] == 2
    # the budgets reached both training stages (too few steps here for either to decide)
    assert report["time_budget_s"] == 1200
    assert report["vae"]["time_budget_s"] == 240.0 and report["vae"]["steps"] == report["vae"]["configured_steps"] == 8
    # what the stages before it left, less the reserve, at least the floor (0.25 x 1200)
    assert 300.0 <= report["pretrain"]["time_budget_s"] <= 1200 - _demo_module().RESERVE_S
    assert report["pretrain"]["configured_steps"] == 6
    assert "pretrain time budget:" in stdout
    assert report["vae"]["budget_plans"] is None and report["pretrain"]["budget_plans"] is None
    assert json.loads((out / "run" / "budget.json").read_text())["plans"] == []
    assert report["encode"]["written"] == 256

    run = out / "run"
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == list(range(1, 7))
    ds = json.loads((run / "ds_config.json").read_text())
    assert ds["zero_optimization"]["stage"] == 3
    from mdm_dist.train.precision import cpu_has_native_bf16

    assert report["dtype"] == ("bfloat16" if cpu_has_native_bf16() else "float32")  # --dtype auto
    assert ds["torch_autocast"]["enabled"] == (report["dtype"] == "bfloat16")


def test_quick_demo_rerun_skips_every_stage(quick_demo):
    out, _ = quick_demo
    before = json.loads((out / "demo_report.json").read_text())
    p = _demo(out)
    assert p.returncode == 0, p.stderr[-3000:]
    for stage in STAGES[:5]:
        assert f"] {stage}: skipped" in p.stdout, stage
    after = json.loads((out / "demo_report.json").read_text())
    assert after["stage_timings_s"]["pretrain"] == before["stage_timings_s"]["pretrain"]
    assert after["quality"]["classifier_on_real"] == before["quality"]["classifier_on_real"]


def test_conditioning_probe_on_the_quick_demo(quick_demo):
    """benchmarks/conditioning_probe.py on the quick demo's MDS and VAE: report lines with the
    ratios, and the held-out figures in range, every ``--eval-every`` steps (no second scoring at
    the end when the last step is one of them), and their plot."""
    out, _ = quick_demo
    from _warm import run_script  # a fresh process without the import bill (tests/_warm.py)

    p = run_script(ROOT / "benchmarks" / "conditioning_probe.py",
                   ["--data", str(out / "mds"), "--vae", str(out / "vae" / "vae.pt"), "--corpus", str(out / "corpus"),
                    "--tokenizer", str(out / "tokenizer"), "--steps", "4", "--every", "2", "--eval-every", "2",
                    "--plot", str(out / "probe_curve.png"),
                    "--batch", "4", "--num-eval", "4", "--set", "diffusion.sample_steps=2",
                    "--min-lr", "1e-4", "--warmup", "1", "--weight-decay", "0.03",
                    "--per-sample-noise", "--decay-groups"], _env(out), ROOT, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    rows = [json.loads(line) for line in p.stdout.splitlines() if line.startswith("{")]
    reports = [r for r in rows if "heldout" not in r]
    scored = [r for r in rows if "heldout" in r]
    assert [r["step"] for r in reports] == [2, 4]
    assert [r["step"] for r in scored] == [2, 4]
    for r in reports:
        assert r["i2t_loss"] > 0 and r["t2i_loss"] > 0 and r["i2t_ratio"] > 0 and r["t2i_ratio"] > 0
    for r in scored:
        held = r["heldout"]
        # configs/tiny.yaml's scales: 2 for text-to-image, 1 for captioning
        assert (held.pop("guidance_scale"), held.pop("caption_guidance_scale")) == (2.0, 1.0)
        assert all(0.0 <= v <= 1.0 for v in held.values())
    with Image.open(out / "probe_curve.png") as im:  # the learning curve of --plot decodes
        assert im.format == "PNG" and min(im.size) > 100


def test_conditioning_probe_eval_every_needs_a_corpus(tmp_path):
    """--eval-every without --corpus is refused before anything loads, naming what to add."""
    p = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "conditioning_probe.py"), "--data", str(tmp_path),
                        "--vae", str(tmp_path / "vae.pt"), "--eval-every", "5"],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 2
    assert "--eval-every needs --corpus" in p.stderr
