"""The training-side reader: MDS streams (written by data_prep/encode_laion.py) -> model batches.

    prepare_streaming_env()                        # once per process, before any dataset
    ds = build_dataset(["data/mds_a", "data/mds_b"], proportions=[0.7, 0.3], batch_size=8)
    loader = build_loader(ds, batch_size=8, collator=MDMCollator(max_text_len=16, pad_id=0))
    for batch in loader: loss = mdm_loss(model, batch, cfg)
    state = loader.state_dict()                    # exact mid-epoch resume: a new loader over a
    loader2.load_state_dict(state)                 # new dataset continues with the next batch

Batches (what ``mdm_dist.diffusion.mdm_loss`` consumes, plus bookkeeping):
    ids         (B, L) int64  caption ids truncated to L = vae.max_text_len, right-padded with pad_id
    text_mask   (B, L) bool   True at caption tokens, False at PAD (PAD is still a training
                              target: the model learns to end the caption; the mask is for
                              metrics and for losses that want to weight real tokens)
    text_len    (B,)   int64
    img_mu      (B, N, d_z) float32   stored posterior moments of the frozen image encoder (fp16
    img_logvar  (B, N, d_z) float32   on disk); mdm_loss draws z = mu + sigma * eps itself, with
                                      its generator (``sample_image_latents`` does it outside)
    category    (B,)   int64
    key, caption  lists of str

Parallelism. StreamingDataset partitions samples over ranks from RANK / WORLD_SIZE /
LOCAL_RANK / LOCAL_WORLD_SIZE in the environment (torchrun and the DeepSpeed launcher set
them; :func:`prepare_streaming_env` fills LOCAL_WORLD_SIZE from the DeepSpeed launcher's
LOCAL_SIZE). Under sequence parallelism the ranks of one sequence-parallel group must see the
same samples (each holds a slice of the same sequences): ``build_dataset(...,
sequence_parallel=sp)`` passes ``replication=sp``, so each group of ``sp`` consecutive ranks
gets identical batches and the data-parallel degree is ``world / sp`` (:func:`data_parallel_rank`).
The project's process layout therefore puts the ranks of a sequence-parallel group next to
each other (rank = dp_rank * sp + sp_rank).

Streaming's shared memory and file locks: it keeps per-dataset shared memory (/dev/shm) and
filelocks in ``tempfile.gettempdir()``; :func:`prepare_streaming_env` points the temp dir at a
folder the project owns (``.cache/streaming`` by default) and removes stale shared memory left by
killed runs (:func:`clean_stale_streaming_shm`, which spares the segments of live jobs).
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

DEFAULT_TMP = Path(__file__).resolve().parents[2] / ".cache" / "streaming"


def prepare_streaming_env(tmp_dir: str | Path | None = None) -> Path:
    """Call once per process before building datasets. Returns the temp dir in use.

    * temp dir (streaming's filelocks, merge_index scratch) -> ``tmp_dir``, else $MDM_STREAMING_TMP,
      else ``<repo>/.cache/streaming``; set in ``TMPDIR`` and ``tempfile.tempdir`` so worker
      processes inherit it;
    * LOCAL_WORLD_SIZE from the DeepSpeed launcher's LOCAL_SIZE when only that is set (set here
      in Python, per process: a global export would break single-process runs);
    * with WORLD_SIZE > 1 and no process group yet, one is started and kept (see
      :func:`_ensure_process_group`): call this after your own ``init_process_group`` if you want
      another backend;
    * stale shared memory of dead runs removed (:func:`clean_stale_streaming_shm`: only segments
      no live process uses, so jobs sharing a node leave each other's datasets alone)."""
    from streaming.base.util import clean_stale_shared_memory

    d = Path(tmp_dir or os.environ.get("MDM_STREAMING_TMP") or DEFAULT_TMP)
    d.mkdir(parents=True, exist_ok=True)
    os.environ["TMPDIR"] = str(d)
    tempfile.tempdir = str(d)
    if "LOCAL_WORLD_SIZE" not in os.environ and "LOCAL_SIZE" in os.environ:
        os.environ["LOCAL_WORLD_SIZE"] = os.environ["LOCAL_SIZE"]
    _ensure_process_group()
    if Path("/dev/shm").is_dir() and Path("/proc/self/maps").is_file():
        clean_stale_streaming_shm()
    else:  # not Linux: streaming's own cleaner, which removes every streaming segment it finds
        clean_stale_shared_memory()
    return d


def _shm_in_use() -> set[str]:
    """Names of the /dev/shm files a live process maps or holds open (from /proc; processes
    whose /proc entries this user cannot read are skipped: their segments are not ours to
    remove anyway, /dev/shm being sticky)."""
    used: set[str] = set()
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/maps") as f:
                for line in f:
                    i = line.find("/dev/shm/")
                    if i >= 0:
                        used.add(line[i + len("/dev/shm/"):].split(" (deleted)")[0].strip())
        except OSError:
            pass
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if target.startswith("/dev/shm/"):
                used.add(target[len("/dev/shm/"):])
    return used


def clean_stale_streaming_shm() -> list[str]:
    """Remove the shared-memory segments of StreamingDatasets whose processes are gone; returns
    their names. Streaming's ``clean_stale_shared_memory`` removes *every* streaming segment,
    live ones included, so a second job on the node (another training, a test run, an
    evaluation) pulled the segments from under the first one's datasets
    (``FileNotFoundError: '/000000_locals'``). Here a segment is stale only when no live process
    maps it or holds it open. Local rank 0 cleans; the other ranks wait for it."""
    import re

    import torch.distributed as dist
    from streaming.base.constant import SHM_TO_CLEAN

    removed: list[str] = []
    if int(os.environ.get("LOCAL_RANK", "0")) == 0:
        pattern = re.compile(r"^\d{6}_(?:%s)$" % "|".join(map(re.escape, SHM_TO_CLEAN)))
        candidates = [n for n in os.listdir("/dev/shm") if pattern.match(n)]
        if candidates:
            used = _shm_in_use()
            for name in candidates:
                if name in used:
                    continue
                try:
                    os.unlink(f"/dev/shm/{name}")
                    removed.append(name)
                except (FileNotFoundError, PermissionError):
                    pass
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
    return removed


def _ensure_process_group() -> None:
    """Start the process group once, for the life of the process, when several ranks run and
    nobody has started it (the trainer starts its own first).

    Streaming otherwise starts one itself in each call that needs it and destroys it at the end
    (``clean_stale_shared_memory``, then ``StreamingDataset.__init__``), on the same
    MASTER_PORT: a rank that reconnects while rank 0 is still tearing down the previous TCPStore
    gets "Connection reset by peer" or waits forever in the new rendezvous (reproduced here in
    2 of 10 two-rank starts)."""
    import torch.distributed as dist

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or not dist.is_available() or dist.is_initialized():
        return
    backend = "nccl" if torch.cuda.is_available() and dist.is_nccl_available() else "gloo"  # streaming's own choice
    dist.init_process_group(backend=backend, rank=int(os.environ["RANK"]), world_size=int(os.environ["WORLD_SIZE"]))


def data_parallel_rank(rank: int, world_size: int, sequence_parallel: int = 1) -> tuple[int, int]:
    """(data-parallel rank, data-parallel world size) of ``rank`` when consecutive groups of
    ``sequence_parallel`` ranks share their samples."""
    if sequence_parallel < 1 or world_size % sequence_parallel:
        raise ValueError(f"world size {world_size} is not a multiple of sequence_parallel {sequence_parallel}")
    return rank // sequence_parallel, world_size // sequence_parallel


def build_dataset(
    paths: Sequence[str],
    proportions: Sequence[float] | None = None,
    batch_size: int = 8,
    shuffle: bool = True,
    seed: int = 0,
    sequence_parallel: int = 1,
    epoch_size: int | None = None,
    num_canonical_nodes: int | None = None,
    **kwargs,
):
    """A StreamingDataset over one or several MDS directories (local, or remote URIs cached
    locally by :func:`_stream`; untested here: no network), mixed by ``proportions`` (relative weights, one per
    path; ``None`` = each stream once per epoch). ``batch_size`` is the per-rank batch size
    (streaming needs it to partition exactly and to resume)."""
    from streaming import Stream, StreamingDataset

    if not paths:
        raise ValueError("no MDS paths given (data.paths is empty)")
    if proportions:
        if len(proportions) != len(paths):
            raise ValueError(f"{len(proportions)} proportions for {len(paths)} paths; give one per path")
        if min(proportions) < 0 or sum(proportions) <= 0:
            raise ValueError(f"proportions {list(proportions)} must be >= 0 with a positive sum")
        total = float(sum(proportions))
        streams = [_stream(Stream, p, w / total) for p, w in zip(paths, proportions)]
    else:
        streams = [_stream(Stream, p, None) for p in paths]
    for p in paths:
        if "://" not in str(p) and not (Path(p) / "index.json").is_file():
            raise FileNotFoundError(f"{p} has no index.json: not an MDS stream (data_prep/encode_laion.py writes them)")
    return StreamingDataset(
        streams=streams, batch_size=batch_size, shuffle=shuffle, shuffle_seed=seed,
        replication=sequence_parallel if sequence_parallel > 1 else None, epoch_size=epoch_size,
        num_canonical_nodes=num_canonical_nodes, **kwargs,
    )


def _stream(Stream, path: str, proportion: float | None):
    """A local MDS directory, or a remote URI (s3://, gs://, ...) cached under
    ``<streaming temp dir>/remote/<hash>`` (streaming downloads shards there on demand)."""
    path = str(path)
    if "://" in path:
        import hashlib

        local = Path(tempfile.gettempdir()) / "remote" / hashlib.sha1(path.encode()).hexdigest()[:16]
        return Stream(remote=path, local=str(local), proportion=proportion)
    return Stream(local=path, proportion=proportion)


class MDMCollator:
    """MDS records -> one batch dict (see the module docstring); picklable for loader workers."""

    def __init__(self, max_text_len: int, pad_id: int):
        self.max_text_len, self.pad_id = max_text_len, pad_id

    def __call__(self, samples: list[dict]) -> dict:
        b, L = len(samples), self.max_text_len
        ids = torch.full((b, L), self.pad_id, dtype=torch.long)
        lens = torch.zeros(b, dtype=torch.long)
        for i, s in enumerate(samples):
            t = torch.from_numpy(np.asarray(s["ids"], dtype=np.int64)[:L])
            ids[i, : len(t)] = t
            lens[i] = len(t)
        mu = torch.from_numpy(np.stack([s["img_mu"] for s in samples]).astype(np.float32))
        logvar = torch.from_numpy(np.stack([s["img_logvar"] for s in samples]).astype(np.float32))
        return {
            "ids": ids,
            "text_mask": torch.arange(L)[None, :] < lens[:, None],
            "text_len": lens,
            "img_mu": mu,
            "img_logvar": logvar,
            "category": torch.tensor([int(s["category"]) for s in samples], dtype=torch.long),
            "key": [s["key"] for s in samples],
            "caption": [s["caption"] for s in samples],
        }


def build_loader(dataset, batch_size: int, collator: MDMCollator, num_workers: int = 0, **kwargs):
    """A StreamingDataLoader (its ``state_dict``/``load_state_dict`` resume mid-epoch exactly).
    On a 2-core CPU, 0 workers reads faster than 2 (CPU_STACK_NOTES)."""
    from streaming import StreamingDataLoader

    return StreamingDataLoader(
        dataset, batch_size=batch_size, collate_fn=collator, num_workers=num_workers,
        persistent_workers=False, **kwargs,
    )


def loader_from_config(cfg, batch_size: int | None = None):
    """Dataset + loader from a Config: ``data.paths``/``proportions``/``shuffle``/``num_workers``,
    ``train.micro_batch_size``/``seed``, ``vae.max_text_len``/``pad_id``, ``parallel.sequence_parallel``."""
    bs = batch_size or cfg.train.micro_batch_size
    ds = build_dataset(cfg.data.paths, cfg.data.proportions or None, batch_size=bs, shuffle=cfg.data.shuffle,
                       seed=cfg.train.seed, sequence_parallel=cfg.parallel.sequence_parallel)
    return ds, build_loader(ds, bs, MDMCollator(cfg.vae.max_text_len, cfg.vae.pad_id), cfg.data.num_workers)


def sample_image_latents(batch: dict, generator: torch.Generator | None = None) -> torch.Tensor:
    """z = mu + exp(logvar / 2) * eps from the batch's stored moments, (B, N, d_z)."""
    mu, logvar = batch["img_mu"], batch["img_logvar"]
    eps = torch.randn(mu.shape, generator=generator, dtype=mu.dtype, device=mu.device)
    return mu + torch.exp(0.5 * logvar) * eps
