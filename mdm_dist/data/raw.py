"""Raw image-caption inputs as img2dataset and friends leave them, read one sample at a time.

Three input kinds, each one *input shard* (the unit of parallelism and resumption in
``data_prep/encode_laion.py``):

* a webdataset ``.tar``: members ``KEY.jpg|jpeg|png|webp|...``, ``KEY.txt`` (caption),
  ``KEY.json`` (metadata), grouped by KEY (the member path up to the first dot of its file name,
  the webdataset convention);
* a ``.parquet`` file with an image-bytes column and a caption column (needs ``pyarrow``);
* a folder of images with captions either beside each image (``NAME.txt``) or in one
  ``captions.jsonl`` (``{"file": ..., "caption": ...}`` per line) or ``captions.tsv``
  (``file<TAB>caption``).

Readers never raise on bad content: they yield :class:`RawSample` objects, some carrying a skip
``reason`` already (``truncated_tar``, ``not_an_image``, ``missing_image``,
``unreadable_parquet_row``, ...). :func:`decode_sample` then decodes, filters and resizes, and
raises :class:`Skip` with a reason for the rest. :func:`list_keys` lists an input shard's keys
without decoding (for duplicate detection across shards). Paths with a ``scheme://`` are opened
through fsspec.
"""

from __future__ import annotations

import io
import json
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff")
CAPTION_EXTS = ("txt",)
META_EXTS = ("json",)
CAPTIONS_FILES = ("captions.jsonl", "captions.tsv")


@dataclass
class RawSample:
    """One sample as read, before decoding; ``reason`` set when it is already known to be bad."""

    source: str
    key: str
    image: bytes | None = None
    caption: str | None = None
    meta: dict = field(default_factory=dict)
    reason: str | None = None
    detail: str = ""


class Skip(Exception):
    """A sample is dropped: ``reason`` is the report's counter name, ``detail`` the log line."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail = reason, detail


# ----------------------------------------------------------------------------------------------
# Opening local or remote files
# ----------------------------------------------------------------------------------------------


def is_remote(path: str) -> bool:
    return "://" in str(path)


def open_binary(path: str):
    if is_remote(path):
        import fsspec

        return fsspec.open(path, "rb").open()
    return open(path, "rb")


def input_kind(path: str) -> str:
    """``tar``, ``parquet`` or ``folder`` for an input shard path."""
    p = str(path).rstrip("/")
    if p.endswith(".tar"):
        return "tar"
    if p.endswith(".parquet"):
        return "parquet"
    if not is_remote(p) and Path(p).is_dir():
        return "folder"
    raise ValueError(f"{path}: not a .tar, a .parquet or a folder of images")


def iter_samples(path: str, **parquet_columns) -> Iterator[RawSample]:
    """Every sample of one input shard, in file order."""
    kind = input_kind(path)
    if kind == "tar":
        return iter_tar(path)
    if kind == "parquet":
        return iter_parquet(path, **parquet_columns)
    return iter_folder(path)


def list_keys(path: str) -> list[str]:
    """The source keys of one input shard, in file order, without decoding anything: what the
    global duplicate-key filter of ``data_prep/encode_laion.py`` runs over before encoding.

    Cost: a tar's member *headers* only (512 B per member; a local file is read by seeking past
    the data, a remote or compressed one has to be streamed through once); a parquet file's key
    column only (none without one: rows keyed by position are never duplicates of each other);
    a folder's file names. Keys that :func:`iter_samples` makes up for an unreadable file or a
    cut-off tar end (``<end of tar>``, ``STEM/<file>``) are not listed. A cut-off tar lists the
    keys whose headers were read."""
    kind = input_kind(path)
    if kind == "tar":
        return _tar_keys(path)
    if kind == "parquet":
        return _parquet_keys(path)
    return _folder_keys(path)


# ----------------------------------------------------------------------------------------------
# webdataset tar
# ----------------------------------------------------------------------------------------------


def _split_member(name: str) -> tuple[str, str]:
    """``dir/000001.jpg`` -> (``dir/000001``, ``jpg``); ``a.b.txt`` -> (``a``, ``b.txt``)."""
    head, _, base = name.rpartition("/")
    stem, dot, ext = base.partition(".")
    return (f"{head}/{stem}" if head else stem), (ext.lower() if dot else "")


def _finish(source: str, key: str, parts: dict[str, bytes]) -> RawSample:
    s = RawSample(source=source, key=key)
    images = [e for e in parts if e.split(".")[-1] in IMAGE_EXTS]
    others = [e for e in parts if e not in images and e not in CAPTION_EXTS + META_EXTS]
    if images:
        s.image = parts[images[0]]
    elif others:
        s.reason, s.detail = "not_an_image", f"no image member, only .{', .'.join(others)}"
    else:
        s.reason, s.detail = "missing_image", "no image member"
    if "txt" in parts:
        try:
            s.caption = parts["txt"].decode("utf-8")
        except UnicodeDecodeError as e:
            s.caption = ""
            s.detail = s.detail or f"caption is not UTF-8 ({e})"
    if "json" in parts:
        try:
            meta = json.loads(parts["json"].decode("utf-8"))
            s.meta = meta if isinstance(meta, dict) else {}
        except (UnicodeDecodeError, json.JSONDecodeError):
            s.meta = {}  # metadata is optional: a bad one does not drop the sample
    return s


class _CountingReader:
    """A read-only file wrapper that counts the bytes read (to find the tar's true length)."""

    def __init__(self, f):
        self.f, self.count = f, 0

    def read(self, n: int = -1) -> bytes:
        data = self.f.read(n)
        self.count += len(data)
        return data

    def drain(self) -> int:
        while self.read(1 << 20):
            pass
        return self.count


def iter_tar(path: str) -> Iterator[RawSample]:
    """Samples of a webdataset tar, read as a stream (works for remote files too).

    A tar that ends early (truncated download) yields the complete samples before the break,
    then one sample with reason ``truncated_tar`` for the member group cut off (its key, or
    ``<end of tar>`` when the break falls between groups). Python's tarfile ends quietly when
    the cut falls inside a member *header*; the missing end-of-archive marker (two zero blocks
    after the last member) gives that case away, and the last group is then reported cut off."""
    key, parts = None, {}
    try:
        with open_binary(path) as raw:
            f = _CountingReader(raw)
            with tarfile.open(fileobj=f, mode="r|*") as tf:
                for m in tf:
                    if not m.isfile():
                        continue
                    k, ext = _split_member(m.name)
                    if key is not None and k != key:
                        yield _finish(path, key, parts)
                        key, parts = None, {}
                    key = k
                    data = tf.extractfile(m).read()
                    if len(data) != m.size:
                        raise tarfile.ReadError(f"member {m.name} is {len(data)} of {m.size} bytes")
                    parts[ext] = data
                end = tf.offset
            if f.drain() - end < 2 * tarfile.BLOCKSIZE:
                raise tarfile.ReadError(f"no end-of-archive marker after byte {end}: the tar is cut off")
    except (tarfile.TarError, EOFError, OSError, ValueError) as e:
        yield RawSample(source=path, key=key or "<end of tar>", reason="truncated_tar", detail=f"{type(e).__name__}: {e}")
        return
    if key is not None:
        yield _finish(path, key, parts)


def _tar_keys(path: str) -> list[str]:
    keys: dict[str, None] = {}
    try:
        with open_binary(path) as raw:
            # random access ("r:") skips member data by seeking; streams ("r|") must read through it
            mode = "r|*" if is_remote(path) else "r:*"
            with tarfile.open(fileobj=raw, mode=mode) as tf:
                for m in tf:
                    if m.isfile():
                        keys.setdefault(_split_member(m.name)[0])
    except (tarfile.TarError, EOFError, OSError, ValueError):
        pass  # truncated: the keys before the break (the encoder counts the break itself)
    return list(keys)


# ----------------------------------------------------------------------------------------------
# parquet
# ----------------------------------------------------------------------------------------------

_IMAGE_COLUMNS = ("image", "jpg", "png", "webp", "image_bytes", "bytes", "img")
_CAPTION_COLUMNS = ("caption", "text", "TEXT", "txt", "prompt")


def _pick(names: list[str], wanted: str | None, candidates: tuple[str, ...], what: str, path: str) -> str:
    if wanted:
        if wanted not in names:
            raise ValueError(f"{path}: no {what} column {wanted!r}; columns: {', '.join(names)}")
        return wanted
    for c in candidates:
        if c in names:
            return c
    raise ValueError(f"{path}: no {what} column among {', '.join(candidates)}; columns: {', '.join(names)}")


def iter_parquet(path: str, image_column: str | None = None, caption_column: str | None = None,
                 key_column: str | None = "key") -> Iterator[RawSample]:
    """Rows of a parquet file; the image column holds bytes, or a struct with a ``bytes`` field
    (the Hugging Face ``Image`` layout). A row that cannot be read becomes a sample with reason
    ``unreadable_parquet_row``; a file that cannot be opened at all becomes one such sample."""
    try:
        import pyarrow.parquet as pq
    except ImportError as e:  # the stack pins no pyarrow: say so rather than fail obscurely
        raise RuntimeError("parquet inputs need pyarrow, which is not installed") from e
    stem = Path(str(path)).stem
    try:
        pf = pq.ParquetFile(open_binary(path))
        names = pf.schema_arrow.names
        img_col = _pick(names, image_column, _IMAGE_COLUMNS, "image", path)
        cap_col = _pick(names, caption_column, _CAPTION_COLUMNS, "caption", path)
        cols = [img_col, cap_col] + ([key_column] if key_column in names else [])
        row = 0
        for gi in range(pf.num_row_groups):
            try:
                table = pf.read_row_group(gi, columns=cols)
            except Exception as e:  # a corrupt row group: every row of it is lost, counted
                n = pf.metadata.row_group(gi).num_rows
                for j in range(n):
                    yield RawSample(path, f"{stem}/{row + j}", reason="unreadable_parquet_row",
                                    detail=f"row group {gi}: {type(e).__name__}: {e}")
                row += n
                continue
            for rec in table.to_pylist():
                key = str(rec.get(key_column)) if rec.get(key_column) is not None else f"{stem}/{row}"
                row += 1
                img = rec.get(img_col)
                if isinstance(img, dict):
                    img = img.get("bytes")
                cap = rec.get(cap_col)
                if img is not None and not isinstance(img, (bytes, bytearray)):
                    yield RawSample(path, key, reason="unreadable_parquet_row",
                                    detail=f"image column holds {type(img).__name__}, not bytes")
                    continue
                s = RawSample(path, key, image=bytes(img) if img is not None else None,
                              caption=None if cap is None else str(cap))
                if img is None:
                    s.reason, s.detail = "missing_image", f"null {img_col}"
                yield s
    except ValueError:
        raise
    except Exception as e:
        yield RawSample(path, f"{stem}/<file>", reason="unreadable_parquet_row", detail=f"{type(e).__name__}: {e}")


def _parquet_keys(path: str, key_column: str = "key") -> list[str]:
    try:
        import pyarrow.parquet as pq

        pf = pq.ParquetFile(open_binary(path))
        if key_column not in pf.schema_arrow.names:
            return []
        keys: dict[str, None] = {}
        for gi in range(pf.num_row_groups):
            try:
                col = pf.read_row_group(gi, columns=[key_column]).column(0).to_pylist()
            except Exception:
                continue  # an unreadable row group: iter_parquet keys its rows by position
            keys.update((str(k), None) for k in col if k is not None)
        return list(keys)
    except Exception:
        return []  # not readable at all: iter_parquet reports it (or the missing pyarrow)


# ----------------------------------------------------------------------------------------------
# folder of images + captions
# ----------------------------------------------------------------------------------------------


def _folder_captions(d: Path) -> dict[str, str]:
    caps: dict[str, str] = {}
    if (d / "captions.jsonl").is_file():
        for line in (d / "captions.jsonl").read_text(encoding="utf-8", errors="replace").splitlines():
            if line.strip():
                try:
                    rec = json.loads(line)
                    caps[str(rec.get("file") or rec.get("key"))] = str(rec.get("caption", ""))
                except json.JSONDecodeError:
                    continue
    if (d / "captions.tsv").is_file():
        for line in (d / "captions.tsv").read_text(encoding="utf-8", errors="replace").splitlines():
            name, sep, cap = line.partition("\t")
            if sep:
                caps[name] = cap
    return caps


def _folder_files(d: Path) -> list[Path]:
    """The files of a folder that are samples (sorted): not captions, metadata or caption lists."""
    return sorted(p for p in d.iterdir() if p.is_file() and p.name not in CAPTIONS_FILES
                  and p.suffix.lower().lstrip(".") not in CAPTION_EXTS + META_EXTS)


def _folder_keys(path: str) -> list[str]:
    return list(dict.fromkeys(p.stem for p in _folder_files(Path(path))))


def iter_folder(path: str) -> Iterator[RawSample]:
    """Every file of a folder (sorted), captions from ``NAME.txt`` or the captions file."""
    d = Path(path)
    caps = _folder_captions(d)
    for p in _folder_files(d):
        ext = p.suffix.lower().lstrip(".")
        s = RawSample(source=str(p), key=p.stem)
        s.caption = caps.get(p.name, caps.get(p.stem))
        side = p.with_suffix(".txt")
        if s.caption is None and side.is_file():
            s.caption = side.read_text(encoding="utf-8", errors="replace")
        if ext in IMAGE_EXTS:
            s.image = p.read_bytes()
        else:
            s.reason, s.detail = "not_an_image", f"file extension .{ext}"
        yield s


# ----------------------------------------------------------------------------------------------
# Decode, filter, resize
# ----------------------------------------------------------------------------------------------


def decode_image(data: bytes, image_size: int, min_size: int = 0) -> tuple[np.ndarray, tuple[int, int]]:
    """Image bytes -> (uint8 RGB ``(image_size, image_size, 3)``, original (width, height)).

    The shorter side is resized to ``image_size`` (bicubic, antialiased), then the centre is
    cropped: what SD/DiT preprocessing does. Raises :class:`Skip` with ``not_an_image`` (not a
    decodable image format), ``corrupt_image`` (truncated or damaged data) or ``too_small``
    (shorter side < ``min_size``)."""
    try:
        img = Image.open(io.BytesIO(data))
    except UnidentifiedImageError as e:
        raise Skip("not_an_image", str(e)) from None
    except Exception as e:
        raise Skip("corrupt_image", f"{type(e).__name__}: {e}") from None
    try:
        img.load()  # full decode: a truncated file fails here, not later in the batch
        w, h = img.size
        if min(w, h) < min_size:
            raise Skip("too_small", f"{w}x{h} < min size {min_size}")
        if img.mode != "RGB":
            if img.mode in ("RGBA", "LA", "P"):  # composite transparency on white
                rgba = img.convert("RGBA")
                bg = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
                img = Image.alpha_composite(bg, rgba)
            img = img.convert("RGB")
        scale = image_size / min(w, h)
        nw, nh = max(image_size, round(w * scale)), max(image_size, round(h * scale))
        if (nw, nh) != (w, h):
            img = img.resize((nw, nh), Image.Resampling.BICUBIC, reducing_gap=None)
        left, top = (nw - image_size) // 2, (nh - image_size) // 2
        img = img.crop((left, top, left + image_size, top + image_size))
        return np.asarray(img, dtype=np.uint8).copy(), (w, h)
    except Skip:
        raise
    except Exception as e:
        raise Skip("corrupt_image", f"{type(e).__name__}: {e}") from None


def clean_caption(caption: str | None) -> str:
    """Raise :class:`Skip` (``missing_caption`` / ``empty_caption``) or return the stripped caption."""
    if caption is None:
        raise Skip("missing_caption", "no caption")
    text = " ".join(caption.split())
    if not text:
        raise Skip("empty_caption", "caption is empty or whitespace")
    return text


def to_tensor_range(images: np.ndarray):
    """uint8 ``(B, H, W, 3)`` -> float32 torch ``(B, 3, H, W)`` in [-1, 1] (the VAE's input)."""
    import torch

    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1.0


# ----------------------------------------------------------------------------------------------
# Command-line inputs -> input shards
# ----------------------------------------------------------------------------------------------


class InputError(ValueError):
    """A command-line input path or glob names nothing usable (scripts exit 2 on it)."""


_GLOB_CHARS = set("*?[")


def expand_inputs(patterns: list[str], extra_suffixes: tuple[str, ...] = ()) -> list[str]:
    """Paths and globs -> sorted, de-duplicated input shards (tar, parquet, image folder, and any
    file ending in ``extra_suffixes``). A folder holding tars or parquet files stands for those;
    any other folder is an image folder. Raises :class:`InputError` naming a pattern that matches
    nothing."""
    suffixes = (".tar", ".parquet") + tuple(extra_suffixes)
    out: list[str] = []
    for pat in patterns:
        if is_remote(pat):
            import fsspec

            fs, _, paths = fsspec.get_fs_token_paths(pat)
            proto = pat.split("://", 1)[0]
            found = [f"{proto}://{p}" if "://" not in p else p for p in paths if p.endswith(suffixes)]
        elif _GLOB_CHARS & set(pat):
            import glob

            found = [p for p in glob.glob(pat) if p.endswith(suffixes) or Path(p).is_dir()]
        elif Path(pat).is_dir():
            inner = sorted(str(p) for p in Path(pat).iterdir() if p.is_file() and p.name.endswith((".tar", ".parquet")))
            found = inner or [pat]
        elif Path(pat).is_file():
            if not pat.endswith(suffixes):
                raise InputError(f"input {pat}: not a .tar, .parquet{''.join(', ' + s for s in extra_suffixes)} file or a folder")
            found = [pat]
        else:
            raise InputError(f"input {pat} does not exist")
        if not found:
            raise InputError(f"input {pat} matches no .tar, .parquet file or folder")
        out.extend(found)
    return sorted(dict.fromkeys(out))
