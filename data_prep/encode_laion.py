"""Encode image-caption corpora into MDS shards: VAE image-latent moments + caption token ids.

    python data_prep/encode_laion.py --input 'laion/{00000..00099}.tar' ... --output data/mds \
        --vae outputs/vae/vae.pt --tokenizer outputs/vae/tokenizer \
        [--image-size N] [--workers N] [--report FILE.json]

Inputs (paths, folders or globs; ``scheme://`` URIs through fsspec): webdataset tars as
img2dataset writes them, parquet files with image bytes and caption columns (needs pyarrow),
folders of images with captions (mdm_dist/data/raw.py). Each input file (or image folder) is
one *input shard*, the unit of parallelism and resumption.

Per sample: decode; drop if the shorter side < --min-size; resize the shorter side to
--image-size (default: the VAE's ``vae.image_size``) and centre-crop; clean the caption (drop if
missing or empty, or under --min-caption-words); drop duplicate keys (below); tokenize
(truncated to ``vae.max_text_len``); VAE-encode in batches of --batch-size with the checkpoint's
frozen image encoder. Each kept sample becomes one MDS record
(mdm_dist/data/schema.py)::

    key         str      source key (img2dataset's KEY, a parquet key column or row, a file stem)
    caption     str      the cleaned caption
    ids         int32    token ids, unpadded (the loader pads to vae.max_text_len with pad_id)
    img_mu      float16  (N, d_z) posterior mean of the image tokens
    img_logvar  float16  (N, d_z) posterior log-variance
    category    int      the JSON metadata's integer "category", else --category (default 0)
    source      str      the input shard it came from

Duplicate keys, across all inputs: the first occurrence of a source key owns it, in input order
(the sorted, expanded --input list; within a shard, file order); every later copy, in the same
or a later shard, is skipped as ``duplicate_key``, whichever worker encodes it and whether or
not the first copy itself survives the other filters (which copy wins must not depend on
decoding). Before encoding, a pre-pass lists every input's keys without decoding
(``mdm_dist.data.raw.list_keys``: tar headers, a parquet ``key`` column, folder file names;
parquet rows without a key column are keyed by position and never deduplicated) and hands
each shard the few keys of its own that earlier inputs already hold. Cost: one header scan per
local tar (512 B read per member; a remote or compressed tar is streamed through once), and in
this process one set entry per distinct key (~100 B each: ~1 GB per 10M keys; split a corpus
far larger than that into runs over disjoint key ranges). Finished shards are listed too, so a
resumed run decides exactly as a clean one; a finished shard whose set of earlier duplicates
no longer matches (inputs added before it) is encoded again.

Output layout and resumption: input shard S is written as an MDS stream into
``OUTPUT/_tmp/<S-id>`` and renamed to ``OUTPUT/<S-id>/`` only when complete (with its
``encode_report.json``), so an interrupted run leaves no corrupt stream; a re-run skips the
input shards whose directory exists and clears ``_tmp``. At the end the per-shard indexes are
merged (``streaming.base.util.merge_index``) into ``OUTPUT/index.json``: ``OUTPUT`` is one
stream for ``StreamingDataset``. ``OUTPUT/encode_settings.json`` fingerprints the checkpoint,
tokenizer and options; resuming with different ones is refused (exit 2).

Bad input loses nothing silently: every dropped sample is counted by reason in the report and
logged (stderr and ``OUTPUT/<S-id>/encode_report.json``) with its file and key. Reasons:
``truncated_tar``, ``corrupt_image``, ``not_an_image``, ``missing_image``, ``missing_caption``,
``empty_caption``, ``caption_too_short``, ``too_small``, ``duplicate_key``,
``unreadable_parquet_row``. The report (``--report``, default ``OUTPUT/encode_report.json``)
holds ``seen``, ``written``, ``skipped`` {reason: count} (``seen == written + sum(skipped)``)
over all input shards, finished now or before. Exit 0 if anything is written, 1 if nothing at
all could be, 2 on a bad flag, a missing input or a settings mismatch.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import logging
import multiprocessing as mp
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mdm_dist.data.raw import (  # noqa: E402
    InputError, RawSample, Skip, clean_caption, decode_image, expand_inputs, iter_samples, list_keys,
    to_tensor_range,
)
from mdm_dist.data.loader import prepare_streaming_env  # noqa: E402
from mdm_dist.data.schema import COLUMNS  # noqa: E402
from mdm_dist.data.tokenizer import CaptionTokenizer  # noqa: E402
from mdm_dist.data.vae_checkpoint import load_vae_checkpoint  # noqa: E402

log = logging.getLogger("encode_laion")

REPORT_NAME = "encode_report.json"
SETTINGS_NAME = "encode_settings.json"
TMP = "_tmp"
MAX_LOGGED = 1000  # skipped samples listed per shard report (all are counted)
CRASH_ENV = "MDM_ENCODE_CRASH_AFTER"  # tests: hard-exit inside the shard after this many finished


def shard_id(path: str) -> str:
    """A directory name for an input shard: its stem plus a hash of its full path."""
    full = path if "://" in path else str(Path(path).resolve())
    stem = Path(path.rstrip("/")).name.split(".")[0] or "shard"
    return f"{stem}-{hashlib.sha1(full.encode()).hexdigest()[:10]}"


def file_digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


# ----------------------------------------------------------------------------------------------
# One input shard (runs in a worker process)
# ----------------------------------------------------------------------------------------------

_STATE: dict = {}


def init_worker(opts: dict) -> None:
    """Load the VAE and tokenizer once per process; split the CPU threads among the workers."""
    torch.set_num_threads(opts["threads"])
    vae, cfg, _ = load_vae_checkpoint(opts["vae"], device=opts["device"])
    _STATE.update(opts=opts, vae=vae, cfg=cfg, tok=CaptionTokenizer(opts["tokenizer"]))


class ShardEncoder:
    """Filters, tokenizes and batches one input shard's samples into an MDSWriter."""

    def __init__(self, writer, source: str, category: int, earlier: dict[str, str] | None = None):
        self.writer, self.source, self.category = writer, source, category
        self.earlier = earlier or {}  # key of this shard -> the earlier input that holds it
        self.opts, self.vae, self.cfg, self.tok = _STATE["opts"], _STATE["vae"], _STATE["cfg"], _STATE["tok"]
        self.seen, self.written, self.truncated = 0, 0, 0
        self.skipped: dict[str, int] = {}
        self.skip_log: list[dict] = []
        self.keys: set[str] = set()
        self.pending: list[tuple[RawSample, np.ndarray, str, np.ndarray]] = []

    def skip(self, s: RawSample, reason: str, detail: str) -> None:
        self.skipped[reason] = self.skipped.get(reason, 0) + 1
        if len(self.skip_log) < MAX_LOGGED:
            self.skip_log.append({"reason": reason, "file": s.source, "key": s.key, "detail": detail})
        log.warning("skip %s: %s key %s: %s", reason, s.source, s.key, detail)

    def add(self, s: RawSample) -> None:
        self.seen += 1
        o = self.opts
        repeated = s.key in self.keys
        self.keys.add(s.key)  # the first copy owns the key, good or bad (as list_keys sees it)
        try:
            if s.reason:
                raise Skip(s.reason, s.detail)
            if s.key in self.earlier:
                raise Skip("duplicate_key", f"key already in earlier input {self.earlier[s.key]}")
            if repeated:
                raise Skip("duplicate_key", "key already earlier in this input shard")
            caption = clean_caption(s.caption)
            if len(caption.split()) < o["min_caption_words"]:
                raise Skip("caption_too_short", f"{len(caption.split())} words < {o['min_caption_words']}")
            image, _ = decode_image(s.image, o["image_size"], o["min_size"])
        except Skip as e:
            self.skip(s, e.reason, e.detail)
            return
        ids = self.tok.encode(caption)
        if len(ids) > self.cfg.vae.max_text_len:
            self.truncated += 1
            ids = ids[: self.cfg.vae.max_text_len]
        self.pending.append((s, image, caption, np.asarray(ids, dtype=np.int32)))
        if len(self.pending) >= o["batch_size"]:
            self.flush()

    @torch.no_grad()
    def flush(self) -> None:
        if not self.pending:
            return
        x = to_tensor_range(np.stack([p[1] for p in self.pending])).to(self.opts["device"])
        mu, logvar = self.vae.encode_image(x)
        mu = mu.float().cpu().numpy().astype(np.float16)
        logvar = logvar.float().cpu().numpy().astype(np.float16)
        for i, (s, _, caption, ids) in enumerate(self.pending):
            cat = s.meta.get("category") if isinstance(s.meta.get("category"), int) else self.category
            self.writer.write({
                "key": s.key, "caption": caption, "ids": ids, "img_mu": mu[i], "img_logvar": logvar[i],
                "category": int(cat), "source": self.source,
            })
        self.written += len(self.pending)
        self.pending = []


def encode_shard(job: tuple[str, str]) -> dict:
    """Encode input shard ``path`` into OUTPUT/_tmp/<sid>, then rename it to OUTPUT/<sid>."""
    from streaming import MDSWriter

    path, sid, earlier = job
    o = _STATE["opts"]
    out = Path(o["output"])
    tmp, final = out / TMP / sid, out / sid
    if tmp.exists():
        shutil.rmtree(tmp)
    t0 = time.time()
    crash_after = int(os.environ.get(CRASH_ENV, "-1"))
    with MDSWriter(out=str(tmp), columns=COLUMNS, compression="zstd", size_limit=o["mds_shard_bytes"]) as w:
        enc = ShardEncoder(w, path, o["category"], earlier)
        kw = {"image_column": o["parquet_image_column"], "caption_column": o["parquet_caption_column"]} \
            if path.endswith(".parquet") else {}
        for s in iter_samples(path, **kw):
            enc.add(s)
            if crash_after >= 0 and o["finished_now"] >= crash_after and enc.written:
                os._exit(17)  # simulated crash mid-shard (tests): tmp dir half-written
        enc.flush()
    report = {
        "source": path, "id": sid, "seen": enc.seen, "written": enc.written, "skipped": enc.skipped,
        "captions_truncated": enc.truncated, "dedup_digest": dedup_digest(earlier), "seconds": time.time() - t0,
        "skipped_samples": enc.skip_log,
    }
    (tmp / REPORT_NAME).write_text(json.dumps(report, indent=1) + "\n")
    if final.exists():  # a stale finished shard being redone (main() dropped it from index.json)
        shutil.rmtree(final)
    os.replace(tmp, final)  # atomic on one filesystem: the shard is there complete or not at all
    return report


# ----------------------------------------------------------------------------------------------
# The run
# ----------------------------------------------------------------------------------------------


def earlier_duplicates(paths: list[str], workers: int) -> list[dict[str, str]]:
    """For each input, in order: {key: earlier input holding it} for its keys that an earlier
    input already listed (the pre-pass of the global duplicate-key filter; module docstring)."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max(1, workers)) as ex:  # header reads: I/O bound
        listings = list(tqdm(ex.map(list_keys, paths), total=len(paths), desc="list keys", unit="shard"))
    owner: dict[str, int] = {}
    out = []
    for i, keys in enumerate(listings):
        out.append({k: paths[owner[k]] for k in keys if k in owner})
        for k in keys:
            owner.setdefault(k, i)
    return out


def dedup_digest(earlier: dict[str, str]) -> str:
    """A fingerprint of the keys a shard was told to skip: a finished shard is current only while
    the inputs before it would tell it the same."""
    return hashlib.sha1("\n".join(sorted(earlier)).encode()).hexdigest()[:16]



def merge(out: Path, ids: list[str]) -> None:
    """OUTPUT/index.json over every finished shard that holds samples."""
    from streaming.base.util import merge_index

    idx = [str(out / sid / "index.json") for sid in ids
           if json.loads((out / sid / "index.json").read_text()).get("shards")]
    (out / "index.json").unlink(missing_ok=True)
    if idx:
        merge_index(idx, str(out))


def summarize(reports: list[dict]) -> dict:
    skipped: dict[str, int] = {}
    for r in reports:
        for k, v in r["skipped"].items():
            skipped[k] = skipped.get(k, 0) + v
    return {
        "seen": sum(r["seen"] for r in reports),
        "written": sum(r["written"] for r in reports),
        "skipped": dict(sorted(skipped.items())),
        "captions_truncated": sum(r.get("captions_truncated", 0) for r in reports),
    }


def parse_args(argv):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--input", nargs="+", required=True, metavar="PATH_OR_GLOB")
    ap.add_argument("--output", required=True, help="MDS output directory (one stream)")
    ap.add_argument("--vae", required=True, metavar="CHECKPOINT", help="vae.pt from launch/train_vae.py")
    ap.add_argument("--tokenizer", required=True, metavar="TOKENIZER_DIR")
    ap.add_argument("--image-size", type=int, default=None, help="default: the checkpoint's vae.image_size")
    ap.add_argument("--workers", type=int, default=1, help="worker processes over input shards (default 1)")
    ap.add_argument("--report", default=None, help="JSON report (default OUTPUT/encode_report.json)")
    ap.add_argument("--batch-size", type=int, default=64, help="images per VAE forward (default 64)")
    ap.add_argument("--min-size", type=int, default=16, help="drop images whose shorter side is smaller (default 16)")
    ap.add_argument("--min-caption-words", type=int, default=1)
    ap.add_argument("--category", type=int, default=0, help="category id when the metadata has none")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--mds-shard-bytes", type=int, default=1 << 26, help="MDS shard size limit (default 64 MiB)")
    ap.add_argument("--parquet-image-column", default=None)
    ap.add_argument("--parquet-caption-column", default=None)
    args = ap.parse_args(argv)
    for flag in ("workers", "batch_size", "mds_shard_bytes"):
        if getattr(args, flag) <= 0:
            ap.error(f"--{flag.replace('_', '-')} must be > 0")
    if args.image_size is not None and args.image_size <= 0:
        ap.error("--image-size must be > 0")
    return args


def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    prepare_streaming_env()  # streaming's scratch (merge_index) in the project's cache, not /tmp
    try:
        paths = expand_inputs(args.input)
        vae_path, tok_dir = Path(args.vae), Path(args.tokenizer)
        if not vae_path.is_file():
            raise InputError(f"--vae {vae_path} does not exist; train one with launch/train_vae.py")
        _, cfg, _ = load_vae_checkpoint(vae_path)
        tok = CaptionTokenizer(tok_dir)
        tok.check_vae(cfg.vae)
    except (InputError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if any(p.endswith(".parquet") for p in paths) and importlib.util.find_spec("pyarrow") is None:
        print("error: parquet inputs need pyarrow, which is not installed in this environment", file=sys.stderr)
        return 2
    image_size = args.image_size or cfg.vae.image_size
    grid = cfg.vae.patch_size * 2 ** (len(cfg.vae.channel_mult) - 1)
    if image_size % grid:
        print(f"error: --image-size {image_size} must be a multiple of {grid} (VAE downsample x patch)", file=sys.stderr)
        return 2
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    settings = {
        "vae": file_digest(vae_path), "tokenizer": file_digest(tok_dir / "tokenizer.model"),
        "image_size": image_size, "min_size": args.min_size, "min_caption_words": args.min_caption_words,
        "category": args.category, "columns": COLUMNS,
    }
    sfile = out / SETTINGS_NAME
    if sfile.exists() and json.loads(sfile.read_text()) != settings:
        print(f"error: {out} was written with other settings ({sfile}); resume with the same "
              "--vae, --tokenizer and filters, or write to a new --output", file=sys.stderr)
        return 2
    sfile.write_text(json.dumps(settings, indent=2) + "\n")
    shutil.rmtree(out / TMP, ignore_errors=True)  # half-written shards of an interrupted run

    earlier = earlier_duplicates(paths, args.workers)
    jobs = [(p, shard_id(p), e) for p, e in zip(paths, earlier)]
    done, todo, stale = [], [], []
    for job in jobs:
        rfile = out / job[1] / REPORT_NAME
        if not rfile.is_file():
            todo.append(job)
        elif json.loads(rfile.read_text()).get("dedup_digest", dedup_digest({})) != dedup_digest(job[2]):
            stale.append(job)
            todo.append(job)
        else:
            done.append(job)
    if stale:
        log.warning("re-encoding %d finished input shards whose duplicate keys changed (inputs added before "
                    "them): %s", len(stale), ", ".join(p for p, _, _ in stale))
        (out / "index.json").unlink(missing_ok=True)  # never an index over a shard being redone
    workers = min(args.workers, max(1, len(todo)))
    opts = {
        "vae": str(vae_path), "tokenizer": str(tok_dir), "device": args.device, "output": str(out),
        "image_size": image_size, "min_size": args.min_size, "min_caption_words": args.min_caption_words,
        "batch_size": args.batch_size, "category": args.category, "mds_shard_bytes": args.mds_shard_bytes,
        "parquet_image_column": args.parquet_image_column, "parquet_caption_column": args.parquet_caption_column,
        "threads": max(1, (os.cpu_count() or 1) // workers), "finished_now": 0,
    }
    if done:
        log.info("resuming: %d of %d input shards already encoded, skipped", len(done), len(jobs))
    t0 = time.time()
    new_reports = []
    bar = tqdm(total=len(todo), desc="encode", unit="shard")
    try:
        if workers == 1:
            init_worker(opts)
            for job in todo:
                new_reports.append(encode_shard(job))
                _STATE["opts"]["finished_now"] += 1
                bar.update()
                bar.set_postfix(written=sum(r["written"] for r in new_reports))
        else:
            with mp.get_context("spawn").Pool(workers, initializer=init_worker, initargs=(opts,)) as pool:
                for r in pool.imap_unordered(encode_shard, todo):
                    new_reports.append(r)
                    bar.update()
                    bar.set_postfix(written=sum(r["written"] for r in new_reports))
    except RuntimeError as e:  # e.g. parquet input without pyarrow
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        bar.close()
    elapsed = time.time() - t0

    shutil.rmtree(out / TMP, ignore_errors=True)
    finished = [s for _, s, _ in jobs if (out / s / REPORT_NAME).is_file()]
    reports = [json.loads((out / s / REPORT_NAME).read_text()) for s in finished]
    merge(out, finished)
    report = summarize(reports)
    new = summarize(new_reports) if new_reports else {"seen": 0, "written": 0}
    report.update({
        "input_shards": len(jobs), "encoded_now": len(new_reports), "already_done": len(done),
        "elapsed_s": round(elapsed, 3), "images_per_s_now": round(new["seen"] / elapsed, 2) if elapsed else None,
        "workers": workers, "image_size": image_size, "output": str(out),
        "shards": {r["id"]: {k: r[k] for k in ("source", "seen", "written", "skipped")} for r in reports},
    })
    report_path = Path(args.report) if args.report else out / REPORT_NAME
    report_path.parent.mkdir(parents=True, exist_ok=True)
    report_path.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps({k: report[k] for k in ("seen", "written", "skipped", "encoded_now", "already_done", "elapsed_s")}))
    if report["written"] == 0:
        print("error: nothing could be written; see the skip reasons above", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
