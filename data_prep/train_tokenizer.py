"""Train the caption tokenizer (SentencePiece unigram, byte fallback) on corpus captions.

    python data_prep/train_tokenizer.py --input data/demo --output data/tokenizer [--vocab-size 512]

``--input`` takes webdataset tars, folders of tars, parquet files, image folders with captions
(every reader of mdm_dist/data/raw.py), and plain text files (``.txt``: one caption per line).
Writes ``tokenizer.model`` and ``special_ids.json`` to OUTPUT: pad = 0 = vae.pad_id,
mask = 1 = vae.mask_id, unk = 2, no bos/eos (see mdm_dist/data/tokenizer.py for why).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterator
from pathlib import Path

from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mdm_dist.data.raw import InputError, expand_inputs, iter_samples  # noqa: E402
from mdm_dist.data.tokenizer import train_tokenizer  # noqa: E402


def iter_captions(paths: list[str]) -> Iterator[str]:
    for path in paths:
        if path.endswith(".txt"):
            with open(path, encoding="utf-8", errors="replace") as f:
                yield from (line.strip() for line in f)
            continue
        for s in iter_samples(path):
            if s.caption:
                yield s.caption


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--input", nargs="+", required=True, metavar="PATH", help="tars, folders, parquet, .txt files or globs")
    ap.add_argument("--output", required=True, help="tokenizer directory (created)")
    ap.add_argument("--vocab-size", type=int, default=512, help="upper bound on the vocabulary, specials included (default 512 = configs/vae_tiny.yaml)")
    ap.add_argument("--seeds", choices=("auto", "words", "substrings"), default="auto",
                    help="unigram seed pieces: frequent words, SentencePiece's substrings, or auto "
                         "(words when they all fit the vocabulary; see mdm_dist/data/tokenizer.py)")
    ap.add_argument("--pad-id", type=int, default=0, help="must equal vae.pad_id (default 0)")
    ap.add_argument("--mask-id", type=int, default=1, help="must equal vae.mask_id (default 1)")
    args = ap.parse_args(argv)
    try:
        paths = expand_inputs(args.input, extra_suffixes=(".txt",))
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.vocab_size < 260:
        print("error: --vocab-size must be >= 260 (256 byte pieces + specials)", file=sys.stderr)
        return 2
    unk = ({0, 1, 2} - {args.pad_id, args.mask_id})
    if len(unk) != 1:
        print("error: --pad-id and --mask-id must be two different ids among 0, 1, 2", file=sys.stderr)
        return 2
    captions = list(tqdm(iter_captions(paths), desc="captions", unit="cap"))
    try:
        out = train_tokenizer(captions, args.output, args.vocab_size, args.pad_id, args.mask_id, unk.pop(),
                              seeds=args.seeds)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    from mdm_dist.data.tokenizer import CaptionTokenizer

    tok = CaptionTokenizer(out)
    print(f"trained on {len(captions)} captions ({tok.specials['seeds']} seeds): vocabulary {tok.vocab_size}, saved to {out}")
    print(f"example: {captions[0]!r} -> {tok.encode(captions[0])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
