"""Training-side reader: StreamingDataset over MDS streams, collation, mixing, exact resume."""

from __future__ import annotations

import gc
from pathlib import Path

import numpy as np
import pytest
import torch

from mdm_dist.data.loader import (
    MDMCollator, build_dataset, build_loader, data_parallel_rank, prepare_streaming_env, sample_image_latents,
)
from mdm_dist.data.schema import COLUMNS

ROOT = Path(__file__).resolve().parents[1]


def _write_stream(path, n: int, prefix: str, seed: int = 0, n_tokens: int = 4, d_z: int = 3):
    from streaming import MDSWriter

    rng = np.random.default_rng(seed)
    with MDSWriter(out=str(path), columns=COLUMNS, compression="zstd", size_limit=1 << 12) as w:
        for i in range(n):  # small size limit: several MDS shards per stream
            w.write({
                "key": f"{prefix}{i:04d}", "caption": f"caption {i}",
                "ids": rng.integers(3, 50, size=int(rng.integers(1, 9))).astype(np.int32),
                "img_mu": rng.standard_normal((n_tokens, d_z)).astype(np.float16),
                "img_logvar": rng.standard_normal((n_tokens, d_z)).astype(np.float16),
                "category": i % 3, "source": prefix,
            })
    return str(path)


@pytest.fixture(scope="module")
def streams(tmp_path_factory):
    d = tmp_path_factory.mktemp("mds")
    prepare_streaming_env(d / "streaming_tmp")
    return _write_stream(d / "a", 60, "a", 0), _write_stream(d / "b", 30, "b", 1)


def _keys(loader):
    return [b["key"] for b in loader]


def test_collate_pads_masks_and_types(streams):
    ds = build_dataset([streams[0]], batch_size=5, shuffle=False)
    batch = next(iter(build_loader(ds, 5, MDMCollator(max_text_len=6, pad_id=0))))
    assert batch["ids"].shape == (5, 6) and batch["ids"].dtype == torch.long
    assert batch["img_mu"].shape == (5, 4, 3) and batch["img_mu"].dtype == torch.float32
    assert batch["img_logvar"].dtype == torch.float32 and batch["category"].dtype == torch.long
    for i in range(5):
        n = int(batch["text_len"][i])
        assert batch["text_mask"][i].tolist() == [True] * n + [False] * (6 - n)
        assert (batch["ids"][i, n:] == 0).all() and (batch["ids"][i, :n] >= 3).all()
    z = sample_image_latents(batch, torch.Generator().manual_seed(0))
    assert z.shape == batch["img_mu"].shape
    del ds
    gc.collect()


@pytest.mark.parametrize("workers", [0, 1])
def test_resume_mid_epoch_yields_exactly_the_remaining_batches(streams, workers):
    """Uninterrupted == the first 7 batches + a fresh loader restored from the state after them;
    with a worker process (data.num_workers = 1, the demo's), whose prefetched batches the state
    must not count as consumed, as without one."""
    collate = MDMCollator(max_text_len=8, pad_id=0)
    ds = build_dataset(list(streams), batch_size=4, shuffle=True, seed=7)
    full = [b for b in build_loader(ds, 4, collate, workers)]
    del ds
    gc.collect()

    ds = build_dataset(list(streams), batch_size=4, shuffle=True, seed=7)
    loader = build_loader(ds, 4, collate, workers)
    it = iter(loader)
    head = [next(it) for _ in range(7)]
    state = loader.state_dict()
    del it, loader, ds
    gc.collect()

    ds = build_dataset(list(streams), batch_size=4, shuffle=True, seed=7)
    loader = build_loader(ds, 4, collate, workers)
    loader.load_state_dict(state)
    tail = list(loader)
    got = head + tail
    assert [b["key"] for b in got] == [b["key"] for b in full]
    for a, b in zip(got, full):
        assert torch.equal(a["ids"], b["ids"]) and torch.equal(a["img_mu"], b["img_mu"])
    assert sorted(k for b in full for k in b["key"]) == sorted([f"a{i:04d}" for i in range(60)] + [f"b{i:04d}" for i in range(30)])
    del ds, loader
    gc.collect()


def test_mixing_proportions(streams):
    ds = build_dataset(list(streams), proportions=[1, 3], batch_size=10, shuffle=True, seed=0, epoch_size=200)
    keys = [k for b in build_loader(ds, 10, MDMCollator(8, 0)) for k in b["key"]]
    assert len(keys) == 200
    frac_b = sum(k.startswith("b") for k in keys) / len(keys)
    assert 0.7 <= frac_b <= 0.8, frac_b  # 3:1 for b, although b holds half as many samples
    del ds
    gc.collect()


def test_data_parallel_rank_and_errors(streams, tmp_path):
    assert data_parallel_rank(5, 8, 2) == (2, 4)
    assert data_parallel_rank(3, 4, 1) == (3, 4)
    with pytest.raises(ValueError, match="multiple"):
        data_parallel_rank(0, 6, 4)
    with pytest.raises(ValueError, match="one per path"):
        build_dataset(list(streams), proportions=[1.0])
    with pytest.raises(FileNotFoundError, match="index.json"):
        build_dataset([str(tmp_path)])


def test_loader_from_config_feeds_mdm_loss(streams):
    """A batch from the config-built loader is what mdm_loss consumes (keys, dtypes, shapes)."""
    from mdm_dist.config import load_config
    from mdm_dist.diffusion import mdm_loss
    from mdm_dist.data.loader import loader_from_config
    from mdm_dist.models.mdm import build_model

    cfg = load_config(ROOT / "configs/tiny.yaml", [
        f"data.paths=[{streams[0]}]", "data.shuffle=false", "train.micro_batch_size=4", "train.global_batch_size=4",
        "vae.image_size=8", "vae.channel_mult=[1,2]", "vae.d_z=3", "vae.max_text_len=8", "model.d_model=64",
        "model.n_layers=1",
    ])
    ds, loader = loader_from_config(cfg)
    batch = next(iter(loader))
    assert batch["ids"].shape == (4, 8) and batch["img_mu"].shape == (4, 4, 3)
    torch.manual_seed(0)
    terms = mdm_loss(build_model(cfg), batch, cfg, generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(terms["total"])
    terms["total"].backward()
    del ds, loader
    gc.collect()


_RANK_SCRIPT = """
import json, os, sys
from mdm_dist.data.loader import MDMCollator, build_dataset, build_loader, prepare_streaming_env
prepare_streaming_env(sys.argv[1])
ds = build_dataset([sys.argv[2]], batch_size=4, shuffle=True, seed=3, sequence_parallel=int(sys.argv[3]))
keys = [k for b in build_loader(ds, 4, MDMCollator(8, 0)) for k in b["key"]]
print(json.dumps(keys))
"""


@pytest.mark.parametrize("sp", [1, 2])
def test_two_ranks_split_or_replicate(streams, tmp_path, sp):
    """2 ranks: disjoint halves covering the stream (sp=1), or identical samples (sp=2: both
    ranks form one sequence-parallel group). The ranks start no process group themselves:
    prepare_streaming_env starts one (streaming's own start/destroy/start on one port hung or
    reset 2 starts in 10)."""
    import json
    import os
    import subprocess
    import sys

    import socket

    with socket.socket() as sock:  # a free port for the process group streaming starts
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    procs = []
    for rank in range(2):
        env = dict(os.environ, RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE="2",
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
        # Files, not pipes: a rank blocked on a full pipe while the other waits for it in a
        # collective would deadlock the pair.
        out_f, err_f = open(tmp_path / f"out{rank}", "w+"), open(tmp_path / f"err{rank}", "w+")
        procs.append((subprocess.Popen([sys.executable, "-c", _RANK_SCRIPT, str(tmp_path / "tmp"), streams[0], str(sp)],
                                       env=env, stdout=out_f, stderr=err_f, text=True), out_f, err_f))
    outs = []
    for p, out_f, err_f in procs:
        try:
            p.wait(timeout=120)
        except subprocess.TimeoutExpired:
            for q, _, _ in procs:
                q.kill()
            err_f.seek(0)
            pytest.fail(f"rank hung for 120 s; its stderr:\n{err_f.read()[-3000:]}")
        out_f.seek(0), err_f.seek(0)
        out, err = out_f.read(), err_f.read()
        out_f.close(), err_f.close()
        assert p.returncode == 0, err[-2000:]
        outs.append(json.loads(out.strip().splitlines()[-1]))
    if sp == 1:
        assert not set(outs[0]) & set(outs[1])
        assert sorted(outs[0] + outs[1]) == [f"a{i:04d}" for i in range(60)]
    else:
        assert outs[0] == outs[1] and sorted(outs[0]) == [f"a{i:04d}" for i in range(60)]


@pytest.mark.skipif(not Path("/dev/shm").is_dir(), reason="Linux /dev/shm only")
def test_stale_shm_cleaner_spares_live_datasets(streams):
    """A dead job's segment goes; the segments of a dataset alive in this process stay, and the
    dataset still reads (streaming's own cleaner removed both)."""
    import os

    from mdm_dist.data.loader import clean_stale_streaming_shm

    ds = build_dataset([streams[1]], batch_size=5, shuffle=False)
    live = {n for n in os.listdir("/dev/shm") if n.startswith(f"{ds._shm_prefix_int:06d}_")}
    assert live, "the dataset registered no shared memory"
    stale = "999983_barrier"  # what a killed run leaves: a segment nobody maps or holds open
    fd = os.open(f"/dev/shm/{stale}", os.O_CREAT | os.O_RDWR, 0o600)
    os.write(fd, b"\0" * 16)
    os.close(fd)
    try:
        removed = clean_stale_streaming_shm()
        assert stale in removed and not Path(f"/dev/shm/{stale}").exists()
        assert not live & set(removed)
        assert all(Path(f"/dev/shm/{n}").exists() for n in live)
        keys = [k for b in build_loader(ds, 5, MDMCollator(8, 0)) for k in b["key"]]
        assert sorted(keys) == [f"b{i:04d}" for i in range(30)]
    finally:
        if Path(f"/dev/shm/{stale}").exists():
            os.unlink(f"/dev/shm/{stale}")
        del ds
        gc.collect()
