"""The caption tokenizer: SentencePiece unigram with byte fallback, and its special ids.

A tokenizer directory holds two files, written by :func:`train_tokenizer`
(``data_prep/train_tokenizer.py`` is its command line)::

    tokenizer.model      the SentencePiece model (unigram, byte_fallback=True)
    special_ids.json     {"pad": 0, "mask": 1, "unk": 2, "bos": -1, "eos": -1,
                          "vocab_size": 320, "byte_fallback": true, ...}

Special ids, and why:

* ``pad`` = ``vae.pad_id`` (0 by default). Captions are stored unpadded; the collator pads them
  to ``vae.max_text_len`` with it. PAD is a real token the model learns to emit after the caption
  ends (docs/model.md), so it doubles as end-of-text: there is no separate EOS.
* ``mask`` = ``vae.mask_id`` (1 by default): the absorbing MASK state of the score-entropy text
  process. It is a SentencePiece *control* symbol, so no caption text ever encodes to it (the
  literal string ``<mask>`` in a caption is spelled out as ordinary pieces).
* ``unk`` = 2: required by SentencePiece; with byte fallback every character that is not a
  piece is spelled in UTF-8 bytes instead, so ``unk`` is in practice never produced.
* ``bos``/``eos`` are disabled (-1): the text sits at a fixed place in the MDM sequence after
  the conditioning tokens, and PAD marks its end.

``vocab_size`` is the SentencePiece piece count (special and 256 byte pieces included); it must
be at most ``vae.vocab_size`` (the VAE's embedding table may be larger than the tokenizer's
vocabulary; the unused rows never receive a target). :meth:`CaptionTokenizer.check_vae` checks
all of this against a config.
"""

from __future__ import annotations

import io
import json
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

MODEL_FILE = "tokenizer.model"
SPECIALS_FILE = "special_ids.json"


def train_tokenizer(
    captions: Iterable[str],
    output: str | Path,
    vocab_size: int = 512,
    pad_id: int = 0,
    mask_id: int = 1,
    unk_id: int = 2,
    seeds: str = "auto",
) -> Path:
    """Train a SentencePiece unigram model in-process on ``captions`` and save it to ``output``.

    ``vocab_size`` is an upper bound (``hard_vocab_limit=False``): a small corpus yields fewer
    pieces. Training is single-threaded, so the model is a function of the captions alone.

    ``seeds`` picks the unigram model's initial pieces, which EM then prunes:

    * ``substrings``: SentencePiece's own (frequent maximal substrings from a suffix array),
      right for natural-language corpora such as LAION;
    * ``words``: the corpus's whitespace words seen at least twice (``seed_sentencepieces_file``,
      scored by count), plus single characters and the byte fallback. On template text such
      as the demo corpus the suffix-array seeds fail: a word like "black" only ever occurs
      inside the same longer phrase, so its maximal repeat spans whitespace and is dropped,
      and the word ends up spelled in fragments ("bl" "ack"), pushing captions past
      ``vae.max_text_len``. Word seeds keep every frequent word one piece;
    * ``auto`` (default): ``words`` when all frequent words fit in the vocabulary
      (``vocab_size`` minus the 259 byte and special pieces), else ``substrings``.

    Returns the output directory.
    """
    import sentencepiece as spm

    ids = {"pad": pad_id, "mask": mask_id, "unk": unk_id}
    if len(set(ids.values())) != 3 or min(ids.values()) < 0 or max(ids.values()) > 2:
        raise ValueError(f"pad, mask and unk ids must be 0, 1 and 2 in some order, got {ids}")
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    captions = [c.strip() for c in captions if c and c.strip()]
    if not captions:
        raise ValueError("no non-empty captions to train the tokenizer on")
    counts: dict[str, int] = {}
    for c in captions:
        for w in c.split():
            counts[w] = counts.get(w, 0) + 1
    # SentencePiece pieces are at most 16 characters (max_sentencepiece_length), the marker included
    words = sorted((w for w, n in counts.items() if n >= 2 and len(w) < 16), key=lambda w: (-counts[w], w))
    if seeds not in ("auto", "words", "substrings"):
        raise ValueError(f"seeds = {seeds!r}; allowed values: auto, words, substrings")
    if seeds == "auto":
        seeds = "words" if len(words) <= vocab_size - 259 else "substrings"
    extra = {}
    if seeds == "words":
        seed_file = out / "seed_pieces.tsv"  # "\u2581word<TAB>count": SentencePiece's word-start marker
        seed_file.write_text("".join(f"\u2581{w}\t{counts[w]}\n" for w in words), encoding="utf-8")
        extra["seed_sentencepieces_file"] = str(seed_file)
    buf = io.BytesIO()
    # SentencePiece gives control symbols the free ids after its own specials, in order: with
    # pad and unk placed, the single free id among 0..2 goes to <mask>.
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(captions),
        model_writer=buf,
        model_type="unigram",
        vocab_size=vocab_size,
        hard_vocab_limit=False,
        byte_fallback=True,
        character_coverage=1.0,
        pad_id=pad_id,
        unk_id=unk_id,
        bos_id=-1,
        eos_id=-1,
        control_symbols=["<mask>"],
        num_threads=1,
        minloglevel=2,
        **extra,
    )
    if seeds == "words":
        (out / "seed_pieces.tsv").unlink()
    sp = spm.SentencePieceProcessor(model_proto=buf.getvalue())
    if sp.piece_to_id("<mask>") != mask_id:
        raise RuntimeError(f"<mask> got id {sp.piece_to_id('<mask>')}, expected {mask_id}")
    (out / MODEL_FILE).write_bytes(buf.getvalue())
    specials = {
        "pad": pad_id, "mask": mask_id, "unk": unk_id, "bos": -1, "eos": -1,
        "vocab_size": sp.get_piece_size(), "model_type": "unigram", "byte_fallback": True,
        "num_captions": len(captions), "seeds": seeds,
        "note": "pad = vae.pad_id, mask = vae.mask_id (absorbing MASK, a control symbol: never "
                "produced by text); PAD ends the caption (no EOS); vocab_size <= vae.vocab_size",
    }
    (out / SPECIALS_FILE).write_text(json.dumps(specials, indent=2) + "\n")
    return out


class CaptionTokenizer:
    """Load a tokenizer directory; encode captions to ids and decode ids to text."""

    def __init__(self, directory: str | Path):
        import sentencepiece as spm

        d = Path(directory)
        model, specials = d / MODEL_FILE, d / SPECIALS_FILE
        for f in (model, specials):
            if not f.is_file():
                raise FileNotFoundError(
                    f"tokenizer directory {d} has no {f.name}; make one with data_prep/train_tokenizer.py"
                )
        self.directory = d
        self.sp = spm.SentencePieceProcessor(model_file=str(model))
        self.specials = json.loads(specials.read_text())
        self.pad_id = int(self.specials["pad"])
        self.mask_id = int(self.specials["mask"])
        self.unk_id = int(self.specials["unk"])
        self.vocab_size = self.sp.get_piece_size()

    def encode(self, text: str) -> list[int]:
        """Caption -> ids, unpadded and untruncated (never contains pad or mask)."""
        return self.sp.encode(text)

    def encode_fixed(self, text: str, length: int) -> np.ndarray:
        """Caption -> int64 ids of exactly ``length``: truncated, then padded with ``pad_id``."""
        return pad_ids(self.encode(text), length, self.pad_id)

    def decode(self, ids: Sequence[int]) -> str:
        """Ids -> text; pad, mask and ids outside the vocabulary are dropped first."""
        keep = [int(i) for i in ids if 0 <= int(i) < self.vocab_size and int(i) not in (self.pad_id, self.mask_id)]
        return self.sp.decode(keep)

    def check_vae(self, vae_cfg) -> None:
        """Raise ValueError unless this tokenizer fits ``vae_cfg`` (a VAEConfig)."""
        problems = []
        if self.pad_id != vae_cfg.pad_id:
            problems.append(f"pad id {self.pad_id} != vae.pad_id {vae_cfg.pad_id}")
        if self.mask_id != vae_cfg.mask_id:
            problems.append(f"mask id {self.mask_id} != vae.mask_id {vae_cfg.mask_id}")
        if self.vocab_size > vae_cfg.vocab_size:
            problems.append(f"vocabulary {self.vocab_size} > vae.vocab_size {vae_cfg.vocab_size}")
        if problems:
            raise ValueError(f"tokenizer {self.directory} does not fit the VAE config: " + "; ".join(problems))


def pad_ids(ids: Sequence[int], length: int, pad_id: int) -> np.ndarray:
    """Truncate ``ids`` to ``length`` and right-pad with ``pad_id``; int64."""
    out = np.full(length, pad_id, dtype=np.int64)
    ids = np.asarray(ids, dtype=np.int64)[:length]
    out[: len(ids)] = ids
    return out
