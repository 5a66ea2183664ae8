"""Offline data pipeline: demo corpus -> tokenizer -> VAE checkpoint -> encode_laion -> MDS -> loader.

Everything is tiny (a 16 px VAE with random weights, tens of samples) so the whole file runs in
well under a minute on 2 cores. Scripts are run in-process through their ``main(argv)`` except
where a real process exit is the point (the simulated crash, --help).
"""

from __future__ import annotations

import importlib.util
import io
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable
TINY_VAE = ["vae.image_size=16", "vae.base_channels=8", "vae.channel_mult=[1,2]", "vae.trunk_width=32",
            "vae.trunk_layers=1", "vae.d_z=8", "vae.vocab_size=512", "vae.max_text_len=12"]


def _script(rel: str):
    spec = importlib.util.spec_from_file_location(Path(rel).stem, ROOT / rel)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


make_demo = _script("data_prep/make_demo_data.py")
train_tok = _script("data_prep/train_tokenizer.py")
encode = _script("data_prep/encode_laion.py")


def _env():
    env = dict(os.environ, OMP_NUM_THREADS="1", MPLCONFIGDIR=str(ROOT / ".cache" / "matplotlib"))
    env["PYTHONPATH"] = str(ROOT)
    return env


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """Demo shards (3 x 12 samples, 24 px), a tokenizer, and a random-weight tiny VAE checkpoint."""
    from mdm_dist.config import load_config
    from mdm_dist.data.vae_checkpoint import save_vae_checkpoint
    from mdm_dist.models.vae import UnifiedVAE

    d = tmp_path_factory.mktemp("corpus")
    assert make_demo.main(["--output", str(d / "demo"), "--num-samples", "36", "--shard-size", "12",
                           "--image-size", "24", "--num-eval", "10", "--seed", "3"]) == 0
    assert train_tok.main(["--input", str(d / "demo"), "--output", str(d / "tok")]) == 0
    cfg = load_config(None, TINY_VAE)
    torch.manual_seed(0)
    save_vae_checkpoint(d / "vae.pt", UnifiedVAE(cfg.vae), cfg, d / "tok", 0)
    return d


def _run_encode(corpus, inputs, out, *extra):
    return encode.main(["--input", *map(str, inputs), "--output", str(out), "--vae", str(corpus / "vae.pt"),
                        "--tokenizer", str(corpus / "tok"), *extra])


def _read_mds(path) -> dict[str, dict]:
    """Every record of an MDS directory by key, read shard by shard (decompressing as
    StreamingDataset would), without a StreamingDataset."""
    import zstandard
    from streaming.base.format import reader_from_json

    index = json.loads((Path(path) / "index.json").read_text())
    out = {}
    for info in index["shards"]:
        raw = Path(path) / info["raw_data"]["basename"]
        if not raw.exists():
            raw.write_bytes(zstandard.ZstdDecompressor().decompress(
                (Path(path) / info["zip_data"]["basename"]).read_bytes(), max_output_size=1 << 30))
        reader = reader_from_json(str(path), None, info)
        for i in range(reader.samples):
            s = reader[i]
            out[s["key"]] = s
    return out


# ----------------------------------------------------------------------------------------------
# Demo corpus and tokenizer
# ----------------------------------------------------------------------------------------------


def test_demo_corpus_is_deterministic_and_complete(corpus, tmp_path):
    assert make_demo.main(["--output", str(tmp_path), "--num-samples", "36", "--shard-size", "12",
                           "--image-size", "24", "--num-eval", "10", "--seed", "3"]) == 0
    for name in ("00000.tar", "00001.tar", "00002.tar", "eval.jsonl", "manifest.json"):
        assert (tmp_path / name).read_bytes() == (corpus / "demo" / name).read_bytes(), name
    with tarfile.open(corpus / "demo" / "00001.tar") as tf:
        names = tf.getnames()
        assert len(names) == 36 and names[:3] == ["000010000.png", "000010000.txt", "000010000.json"]
        meta = json.loads(tf.extractfile("000010000.json").read())
        cap = tf.extractfile("000010000.txt").read().decode()
        img = Image.open(io.BytesIO(tf.extractfile("000010000.png").read()))
    assert meta["caption"] == cap and img.size == (24, 24)
    assert {"colour", "shape", "size", "position", "background", "count"} <= set(meta)
    assert meta["colour"] in cap and (meta["shape"] in cap)
    evals = [json.loads(line) for line in (corpus / "demo" / "eval.jsonl").read_text().splitlines()]
    assert len(evals) == 10 and all(e["key"].startswith("eval") for e in evals)
    other = tmp_path / "other"
    make_demo.main(["--output", str(other), "--num-samples", "12", "--image-size", "24", "--seed", "4"])
    assert (other / "00000.tar").read_bytes() != (corpus / "demo" / "00000.tar").read_bytes()


def test_tokenizer_round_trip(corpus):
    from mdm_dist.config import load_config
    from mdm_dist.data.tokenizer import CaptionTokenizer

    tok = CaptionTokenizer(corpus / "tok")
    specials = json.loads((corpus / "tok" / "special_ids.json").read_text())
    assert (tok.pad_id, tok.mask_id, tok.unk_id) == (0, 1, 2) == (specials["pad"], specials["mask"], specials["unk"])
    assert tok.sp.id_to_piece(1) == "<mask>" and tok.vocab_size <= 512
    for cap in ["a small red circle on the left", "three crosses, yellow, on the right",
                "ünïcode 日本 text <mask> never seen"]:
        ids = tok.encode(cap)
        assert 0 not in ids and 1 not in ids and 2 not in ids  # byte fallback: no unk, never mask
        assert tok.decode(ids) == cap
        fixed = tok.encode_fixed(cap, 40)
        assert fixed.shape == (40,) and fixed.dtype == np.int64 and (fixed[len(ids):] == 0).all()
        assert tok.decode(list(fixed) + [1, 1]) == cap
    assert len(tok.encode_fixed("a " * 50, 12)) == 12
    tok.check_vae(load_config(None, TINY_VAE).vae)
    with pytest.raises(ValueError, match="vocabulary"):
        tok.check_vae(load_config(None, ["vae.vocab_size=100"]).vae)


def test_tokenizer_keeps_template_words_whole(tmp_path):
    """Word seeds (auto-chosen here): on the template corpus every caption word is one piece
    (SentencePiece's own seeds spell words such as 'black' in fragments there)."""
    from mdm_dist.data.shapes import random_scene
    from mdm_dist.data.tokenizer import CaptionTokenizer, train_tokenizer

    rng = np.random.default_rng(0)
    caps = [random_scene(rng).caption(i) for i in range(600)]
    tok = CaptionTokenizer(train_tokenizer(caps, tmp_path / "tok", vocab_size=512))
    for c in caps[:50]:
        assert len(tok.encode(c)) == len(c.replace(",", " ,").split()), tok.sp.encode(c, out_type=str)
    assert max(len(tok.encode(c)) for c in caps) <= 12 and tok.specials["seeds"] == "words"
    sub = CaptionTokenizer(train_tokenizer(caps, tmp_path / "sub", vocab_size=512, seeds="substrings"))
    assert sub.decode(sub.encode(caps[0])) == caps[0]


def test_scene_captions_name_the_ground_truth():
    from mdm_dist.data.shapes import COUNT_WORDS, PLURALS, SCENE_TEMPLATES, SceneSpec, render_scene

    for count in (1, 2, 3):
        spec = SceneSpec("red", "cross", "small", "left", "gray", count)
        for t in range(len(SCENE_TEMPLATES)):
            cap = spec.caption(t)
            assert "red" in cap and (PLURALS["cross"] if count > 1 else "cross") in cap
            assert (COUNT_WORDS[count] in cap.split()) or (count == 1 and cap.split()[0] == "a"), cap
        img = render_scene(spec, 32)
        assert img.shape == (32, 32, 3) and (img == (220, 40, 40)).all(-1).any()


# ----------------------------------------------------------------------------------------------
# Encode -> MDS -> loader
# ----------------------------------------------------------------------------------------------


def test_round_trip_tokens_exact_latents_fp16(corpus, tmp_path):
    from mdm_dist.data.loader import MDMCollator, build_dataset, build_loader, prepare_streaming_env
    from mdm_dist.data.raw import decode_image, to_tensor_range
    from mdm_dist.data.tokenizer import CaptionTokenizer
    from mdm_dist.data.vae_checkpoint import load_vae_checkpoint

    out = tmp_path / "mds"
    assert _run_encode(corpus, [corpus / "demo"], out, "--batch-size", "5", "--report", str(tmp_path / "r.json")) == 0
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["seen"] == 36 and report["written"] == 36 and report["skipped"] == {}
    assert report["seen"] == report["written"] + sum(report["skipped"].values())

    prepare_streaming_env(tmp_path / "shm")
    ds = build_dataset([str(out)], batch_size=7, shuffle=False)
    loader = build_loader(ds, 7, MDMCollator(max_text_len=12, pad_id=0))
    batches = list(loader)
    assert sum(len(b["key"]) for b in batches) == 36

    tok = CaptionTokenizer(corpus / "tok")
    vae, _, _ = load_vae_checkpoint(corpus / "vae.pt")
    truth = {}
    for path in sorted((corpus / "demo").glob("*.tar")):
        with tarfile.open(path) as tf:
            for m in tf.getmembers():
                key, ext = m.name.split(".")
                truth.setdefault(key, {})[ext] = tf.extractfile(m).read()
    seen = set()
    for b in batches:
        assert b["ids"].dtype == torch.long and b["ids"].shape[1] == 12
        assert b["img_mu"].dtype == torch.float32 and b["img_mu"].shape[1:] == (16, 8)  # 16 px / 2 (downsample) / 2 (patch) = 4x4 tokens
        assert b["category"].dtype == torch.long
        img = np.stack([decode_image(truth[k]["png"], 16)[0] for k in b["key"]])
        with torch.no_grad():
            mu, logvar = vae.encode_image(to_tensor_range(img))
        torch.testing.assert_close(b["img_mu"], mu, rtol=2e-3, atol=2e-3)
        torch.testing.assert_close(b["img_logvar"], logvar, rtol=2e-3, atol=2e-3)
        for i, k in enumerate(b["key"]):
            cap = truth[k]["txt"].decode()
            assert b["caption"][i] == cap
            assert b["ids"][i].tolist() == tok.encode_fixed(cap, 12).tolist()
            assert int(b["text_len"][i]) == min(12, len(tok.encode(cap))) == int(b["text_mask"][i].sum())
            seen.add(k)
    assert seen == set(truth)


def _png(size=(20, 20), colour=(200, 10, 10)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, format="PNG")
    return buf.getvalue()


def _tar(path: Path, members: list[tuple[str, bytes]]) -> Path:
    with tarfile.open(path, "w") as tf:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return path


def test_bad_inputs_are_skipped_counted_and_logged(corpus, tmp_path, caplog):
    good = _png()
    bad = _tar(tmp_path / "bad.tar", [
        ("ok1.png", good), ("ok1.txt", b"a red square"), ("ok1.json", b"{}"),
        ("trunc.png", good[: len(good) // 2]), ("trunc.txt", b"half an image"),
        ("text.jpg", b"this is not an image at all"), ("text.txt", b"a caption"),
        ("pdf.pdf", b"%PDF-1.4 ..."), ("pdf.txt", b"a document"),
        ("nocap.png", good),
        ("empty.png", good), ("empty.txt", b"   \n "),
        ("noimg.txt", b"a caption without an image"),
        ("tiny.png", _png((6, 6))), ("tiny.txt", b"a tiny image"),
        ("ok2.png", good), ("ok2.txt", b"another red square"),
        ("ok1.png", good), ("ok1.txt", b"the same key again"),
    ])
    # members of one sample adjacent (webdataset order); each member is one 512 B header + one
    # 512 B data block here, so k1.png's data starts at byte 2560: cut the archive inside it
    full = _tar(tmp_path / "full.tar", [m for i in range(3) for m in (
        (f"k{i}.png", _png(colour=(i * 40, 0, 0))), (f"k{i}.txt", b"a red thing"))])
    cut = tmp_path / "cut.tar"
    cut.write_bytes(full.read_bytes()[:2600])
    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / "a.png").write_bytes(good)
    (folder / "b.png").write_bytes(good)
    (folder / "notes.csv").write_bytes(b"1,2,3")
    (folder / "captions.jsonl").write_text(json.dumps({"file": "a.png", "caption": "a red square"}) + "\n")
    (folder / "b.txt").write_text("a sidecar caption")

    out = tmp_path / "mds"
    with caplog.at_level("WARNING"):
        rc = _run_encode(corpus, [bad, cut, folder], out, "--min-size", "8")
    assert rc == 0
    report = json.loads((out / "encode_report.json").read_text())
    assert report["skipped"] == {
        "corrupt_image": 1, "duplicate_key": 1, "empty_caption": 1, "missing_caption": 1,
        "missing_image": 1, "not_an_image": 3, "too_small": 1, "truncated_tar": 1,
    }, report["skipped"]
    assert report["written"] == 2 + 1 + 2  # ok1, ok2; k0; a, b
    assert report["seen"] == report["written"] + sum(report["skipped"].values())
    text = caplog.text
    assert "skip corrupt_image" in text and "bad.tar key trunc" in text and "cut.tar key k1" in text
    assert "notes.csv key notes" in text
    keys = set(_read_mds(out))
    assert keys == {"ok1", "ok2", "k0", "a", "b"}
    assert _read_mds(out)["ok1"]["caption"] == "a red square"  # the first of the duplicate keys


@pytest.mark.skipif(importlib.util.find_spec("pyarrow") is None, reason="pyarrow is not installed")
def test_parquet_input_with_unreadable_row(corpus, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table({"image": [_png(), 12345 and b"\x89PNG broken", _png()],
                      "caption": ["a red square", "broken", "another"], "key": ["p0", "p1", "p2"]})
    pq.write_table(table, tmp_path / "x.parquet")
    out = tmp_path / "mds"
    assert _run_encode(corpus, [tmp_path / "x.parquet"], out) == 0
    report = json.loads((out / "encode_report.json").read_text())
    assert report["written"] == 2 and report["seen"] == 3


def test_exit_codes(corpus, tmp_path):
    bad = _tar(tmp_path / "all_bad.tar", [("a.txt", b"caption only")])
    assert _run_encode(corpus, [bad], tmp_path / "o1") == 1  # nothing at all written
    assert _run_encode(corpus, [tmp_path / "missing.tar"], tmp_path / "o2") == 2
    assert _run_encode(corpus, [corpus / "demo"], tmp_path / "o3", "--image-size", "10") == 2
    with pytest.raises(SystemExit) as e:
        _run_encode(corpus, [corpus / "demo"], tmp_path / "o4", "--no-such-flag")
    assert e.value.code == 2


def test_interrupted_then_resumed_equals_clean_run(corpus, tmp_path):
    inputs = [str(corpus / "demo")]
    clean = tmp_path / "clean"
    assert _run_encode(corpus, inputs, clean, "--batch-size", "4") == 0
    cmd = [PY, str(ROOT / "data_prep/encode_laion.py"), "--input", *inputs, "--output", str(tmp_path / "resumed"),
           "--vae", str(corpus / "vae.pt"), "--tokenizer", str(corpus / "tok"), "--batch-size", "4"]
    crashed = subprocess.run(cmd, env=dict(_env(), MDM_ENCODE_CRASH_AFTER="1"), capture_output=True, text=True)
    assert crashed.returncode == 17, crashed.stderr[-2000:]
    out = tmp_path / "resumed"
    done = [p for p in out.iterdir() if (p / "encode_report.json").is_file()]
    assert len(done) == 1 and any((out / "_tmp").iterdir())  # one shard finished, one half-written
    assert not (out / "index.json").exists()
    assert _run_encode(corpus, inputs, out, "--batch-size", "4") == 0
    report = json.loads((out / "encode_report.json").read_text())
    assert report["already_done"] == 1 and report["encoded_now"] == 2 and report["written"] == 36
    assert not (out / "_tmp").exists()
    a, b = _read_mds(clean), _read_mds(out)
    assert a.keys() == b.keys()
    for k in a:
        for col in ("caption", "category", "source"):
            assert a[k][col] == b[k][col]
        for col in ("ids", "img_mu", "img_logvar"):
            np.testing.assert_array_equal(a[k][col], b[k][col])
    # a third run finds everything done and changes nothing
    assert _run_encode(corpus, inputs, out, "--batch-size", "4") == 0
    assert json.loads((out / "encode_report.json").read_text())["encoded_now"] == 0
    # resuming with other settings is refused
    assert _run_encode(corpus, inputs, out, "--min-size", "3") == 2


def test_two_workers_match_one(corpus, tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    assert _run_encode(corpus, [corpus / "demo"], one) == 0
    proc = subprocess.run([PY, str(ROOT / "data_prep/encode_laion.py"), "--input", str(corpus / "demo"),
                           "--output", str(two), "--vae", str(corpus / "vae.pt"), "--tokenizer",
                           str(corpus / "tok"), "--workers", "2"], env=_env(), capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    a, b = _read_mds(one), _read_mds(two)
    assert a.keys() == b.keys()
    for k in a:
        assert a[k]["ids"].tolist() == b[k]["ids"].tolist()
        np.testing.assert_allclose(a[k]["img_mu"].astype(np.float32), b[k]["img_mu"].astype(np.float32), atol=2e-3)


def _dup_shard(path: Path, tag: str, keys: list[str]) -> Path:
    return _tar(path, [m for k in keys for m in ((f"{k}.png", _png()), (f"{k}.txt", f"{k} from {tag}".encode()))])


def _dup_outcome(out: Path) -> tuple[dict, dict[str, str]]:
    """(skip counts, {key: caption}) of an encode output; asserts no key is stored twice."""
    report = json.loads((out / "encode_report.json").read_text())
    index = json.loads((out / "index.json").read_text())
    records = _read_mds(out)
    assert sum(sh["samples"] for sh in index["shards"]) == len(records) == report["written"]
    assert report["seen"] == report["written"] + sum(report["skipped"].values())
    return report["skipped"], {k: r["caption"] for k, r in records.items()}


def test_duplicate_keys_are_global_first_copy_wins(corpus, tmp_path):
    """A key's first copy in input order owns it: later copies in the same or a later shard are
    skipped as duplicate_key, the same with 1 or 2 workers and after a crash and resume."""
    from mdm_dist.data.raw import list_keys

    src = tmp_path / "in"
    src.mkdir()
    a = _dup_shard(src / "a.tar", "a", ["k1", "k2", "k3", "k2", "k4"])  # k2 twice, not adjacent
    _dup_shard(src / "b.tar", "b", ["k3", "k5", "k1", "k6"])  # k3, k1 already in a.tar
    assert list_keys(str(a)) == ["k1", "k2", "k3", "k4"]
    want_skips = {"duplicate_key": 3}
    want = {"k1": "k1 from a", "k2": "k2 from a", "k3": "k3 from a", "k4": "k4 from a", "k5": "k5 from b",
            "k6": "k6 from b"}
    cmd = [PY, str(ROOT / "data_prep/encode_laion.py"), "--input", str(src), "--vae", str(corpus / "vae.pt"),
           "--tokenizer", str(corpus / "tok"), "--batch-size", "1"]

    assert _run_encode(corpus, [src], tmp_path / "one", "--batch-size", "1") == 0
    assert _dup_outcome(tmp_path / "one") == (want_skips, want)
    two = subprocess.run(cmd + ["--output", str(tmp_path / "two"), "--workers", "2"], env=_env(),
                         capture_output=True, text=True)
    assert two.returncode == 0, two.stderr[-2000:]
    assert _dup_outcome(tmp_path / "two") == (want_skips, want)
    assert "key already in earlier input" in two.stderr and str(a) in two.stderr

    # crash inside b.tar (a.tar finished), then resume: b.tar still skips a.tar's keys
    res = tmp_path / "resumed"
    crashed = subprocess.run(cmd + ["--output", str(res)], env=dict(_env(), MDM_ENCODE_CRASH_AFTER="1"),
                             capture_output=True, text=True)
    assert crashed.returncode == 17, crashed.stderr[-2000:]
    assert _run_encode(corpus, [src], res, "--batch-size", "1") == 0
    assert json.loads((res / "encode_report.json").read_text())["already_done"] == 1
    assert _dup_outcome(res) == (want_skips, want)

    # an input added *before* a finished shard takes its keys: that shard is encoded again
    _dup_shard(src / "0.tar", "0", ["k4"])
    assert _run_encode(corpus, [src], res, "--batch-size", "1") == 0
    report = json.loads((res / "encode_report.json").read_text())
    assert (report["encoded_now"], report["already_done"]) == (2, 1)  # 0.tar and a.tar; b.tar kept
    assert _dup_outcome(res) == ({"duplicate_key": 4}, {**want, "k4": "k4 from 0"})


@pytest.mark.parametrize("script", ["data_prep/make_demo_data.py", "data_prep/train_tokenizer.py",
                                    "data_prep/encode_laion.py", "launch/train_vae.py",
                                    "benchmarks/data_throughput.py"])
def test_every_script_answers_help(script):
    proc = subprocess.run([PY, str(ROOT / script), "--help"], env=_env(), capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "usage:" in proc.stdout
