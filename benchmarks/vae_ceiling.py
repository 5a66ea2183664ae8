"""What a VAE stage leaves text-to-image: the demo's pixel classifier on the VAE's reconstructions
of held-out demo images.

    python benchmarks/vae_ceiling.py --vae outputs/demo/vae/vae.pt --corpus outputs/demo/corpus [--num 500] [--json OUT]

Each held-out image of ``--corpus`` (data_prep/make_demo_data.py's ``eval.jsonl``; draw the corpus
with ``--num-eval 500`` for a finer figure than the demo's 100) is encoded to its posterior mean,
decoded, and classified (mdm_dist/eval/classifier.py). A generated image is scored the same way,
so the fraction read right (prompted colour and shape) bounds the demo's text-to-image figure with
this VAE. Prints one JSON line: that fraction, colour and shape separately, the classifier on the
real images, and the reconstructions' PSNR (dB, pixels in [-1, 1]).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--vae", required=True, help="the VAE stage's vae.pt (launch/train_vae.py)")
    ap.add_argument("--corpus", required=True, help="a demo corpus folder with eval.jsonl and manifest.json")
    ap.add_argument("--num", type=int, default=500, help="held-out images scored (at most those in eval.jsonl)")
    ap.add_argument("--batch", type=int, default=250)
    ap.add_argument("--json", default=None, help="also write the result here")
    args = ap.parse_args(argv)
    if args.num < 1 or args.batch < 1:
        ap.error("--num and --batch must be >= 1")
    import numpy as np
    import torch

    from mdm_dist.data.raw import to_tensor_range
    from mdm_dist.data.vae_checkpoint import load_vae_checkpoint
    from mdm_dist.eval.classifier import classify_batch
    from mdm_dist.eval.heldout import heldout_images, heldout_records

    try:
        vae = load_vae_checkpoint(args.vae)[0].eval()
        records = heldout_records(Path(args.corpus), args.num)
    except (FileNotFoundError, ValueError) as e:
        print(f"vae_ceiling.py: error: {e}", file=sys.stderr)
        return 2
    x = to_tensor_range(heldout_images(Path(args.corpus), records, vae.cfg.image_size))
    recon, se = [], 0.0
    with torch.no_grad():
        for i in range(0, len(x), args.batch):
            r = vae.decode_image(vae.encode_image(x[i:i + args.batch])[0]).clamp(-1, 1)
            se += float((r - x[i:i + args.batch]).square().sum())
            recon.append(r)
    preds, real = classify_batch(torch.cat(recon)), classify_batch(x)
    colours, shapes = [r["colour"] for r in records], [r["shape"] for r in records]
    out = {
        "vae": str(args.vae), "num": len(records),
        "classifier_on_reconstructions": float(np.mean([p.matches(c, s) for p, c, s in zip(preds, colours, shapes)])),
        "colour": float(np.mean([p.colour == c for p, c in zip(preds, colours)])),
        "shape": float(np.mean([p.shape == s for p, s in zip(preds, shapes)])),
        "classifier_on_real": float(np.mean([p.matches(c, s) for p, c, s in zip(real, colours, shapes)])),
        "psnr": 10 * math.log10(4.0 / max(se / x.numel(), 1e-12)),
    }
    print(json.dumps(out))
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
