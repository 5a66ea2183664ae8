"""Draw the embedded demo corpus: captioned coloured-shape images as img2dataset-style tar shards.

    python data_prep/make_demo_data.py --output data/demo [--num-samples 4000] [--seed 0]

Writes, under OUTPUT::

    00000.tar, 00001.tar, ...   webdataset shards: KEY.png, KEY.txt (caption), KEY.json
                                (key, caption, width, height, and the ground truth: colour,
                                shape, size, position, background, count, template)
    eval.jsonl                  held-out samples (keys never in the shards): one JSON per line
                                with the caption and the ground-truth spec, for scoring
                                text-to-image and captioning
    manifest.json               arguments, counts, and the attribute vocabulary

Every sample is drawn from its own random stream ``default_rng([seed, split, index])``, so the
corpus is a function of the arguments only (same seed, same bytes: tar headers carry mtime 0),
whatever the order of generation. Scenes: 1-3 equal shapes (4 shapes x 6 colours x 2 sizes x
3 positions x 3 backgrounds x 3 counts = 1296 specs) in 6 caption templates, with a small random
shift of the shape column (mdm_dist/data/shapes.py).
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import tarfile
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mdm_dist.data.shapes import (  # noqa: E402
    BACKGROUNDS, COLOURS, COUNTS, POSITIONS, SCENE_TEMPLATES, SHAPES, SIZES, random_scene, render_scene,
)

TRAIN, EVAL = 0, 1


def draw(seed: int, split: int, index: int, image_size: int):
    """(spec, template, caption, uint8 image) of one sample, from its own random stream."""
    rng = np.random.default_rng([seed, split, index])
    spec = random_scene(rng)
    template = int(rng.integers(len(SCENE_TEMPLATES)))
    image = render_scene(spec, image_size, jitter=rng)
    return spec, template, spec.caption(template), image


def png_bytes(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG", optimize=False)
    return buf.getvalue()


def add_member(tf: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), 0, 0o644
    info.uname = info.gname = ""
    tf.addfile(info, io.BytesIO(data))


def sample_record(key: str, spec, template: int, caption: str, size: int) -> dict:
    return {"key": key, "caption": caption, "width": size, "height": size, "template": template, **spec.to_dict()}


def write_shards(out: Path, num_samples: int, shard_size: int, seed: int, image_size: int) -> list[str]:
    names = []
    bar = tqdm(total=num_samples, desc="demo shards", unit="img")
    for shard, start in enumerate(range(0, num_samples, shard_size)):
        name = f"{shard:05d}.tar"
        tmp = out / (name + ".tmp")
        with tarfile.open(tmp, "w", format=tarfile.USTAR_FORMAT) as tf:
            for i in range(start, min(start + shard_size, num_samples)):
                key = f"{shard:05d}{i - start:04d}"  # img2dataset's key layout: shard + index
                spec, template, caption, image = draw(seed, TRAIN, i, image_size)
                rec = sample_record(key, spec, template, caption, image_size)
                add_member(tf, f"{key}.png", png_bytes(image))
                add_member(tf, f"{key}.txt", caption.encode())
                add_member(tf, f"{key}.json", json.dumps(rec, sort_keys=True).encode())
                bar.update()
        tmp.replace(out / name)
        names.append(name)
    bar.close()
    return names


def write_eval(out: Path, num_eval: int, seed: int, image_size: int, train_specs: set) -> int:
    seen = 0
    with open(out / "eval.jsonl", "w") as f:
        for i in range(num_eval):
            spec, template, caption, _ = draw(seed, EVAL, i, image_size)
            rec = sample_record(f"eval{i:05d}", spec, template, caption, image_size)
            rec["spec_in_train"] = spec in train_specs
            seen += rec["spec_in_train"]
            f.write(json.dumps(rec, sort_keys=True) + "\n")
    return seen


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--output", required=True, help="directory for the shards (created)")
    ap.add_argument("--num-samples", type=int, default=4000, help="training samples (default 4000)")
    ap.add_argument("--num-eval", type=int, default=256, help="held-out samples in eval.jsonl (default 256)")
    ap.add_argument("--shard-size", type=int, default=1000, help="samples per tar shard (default 1000)")
    ap.add_argument("--image-size", type=int, default=64, help="rendered size in pixels (default 64)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    for flag in ("num_samples", "shard_size", "image_size"):
        if getattr(args, flag) <= 0:
            ap.error(f"--{flag.replace('_', '-')} must be > 0")
    if args.num_eval < 0:
        ap.error("--num-eval must be >= 0")
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    shards = write_shards(out, args.num_samples, args.shard_size, args.seed, args.image_size)
    train_specs = {draw(args.seed, TRAIN, i, 8)[0] for i in range(args.num_samples)}
    in_train = write_eval(out, args.num_eval, args.seed, args.image_size, train_specs)
    manifest = {
        "num_samples": args.num_samples, "num_eval": args.num_eval, "shard_size": args.shard_size,
        "image_size": args.image_size, "seed": args.seed, "shards": shards,
        "distinct_train_specs": len(train_specs), "eval_specs_seen_in_train": in_train,
        "attributes": {"colour": list(COLOURS), "shape": list(SHAPES), "size": list(SIZES),
                       "position": list(POSITIONS), "background": list(BACKGROUNDS), "count": list(COUNTS)},
        "templates": list(SCENE_TEMPLATES),
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    print(f"wrote {len(shards)} shards ({args.num_samples} samples) and eval.jsonl ({args.num_eval}) to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
