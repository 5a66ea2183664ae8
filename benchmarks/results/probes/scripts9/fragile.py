# Ninth-session one-off probe (a record of how benchmarks/demo_results.md's numbers were made; not
# maintained or tested). Run from the repo root: .venv/bin/python fragile.py ARGS (see demo_results.md).
import sys, numpy as np, torch
sys.path.insert(0, ".")
from pathlib import Path
from mdm_dist.eval.heldout import heldout_records, heldout_images
from mdm_dist.eval.classifier import classify_batch
from mdm_dist.data.vae_checkpoint import load_vae_checkpoint
from mdm_dist.data.raw import to_tensor_range
run = Path(sys.argv[1]); vae, _, _ = load_vae_checkpoint(run / "vae/vae.pt")
recs = heldout_records(run / "corpus", 100); x = to_tensor_range(heldout_images(run / "corpus", recs, 32))
g = torch.Generator().manual_seed(0)
with torch.no_grad():
    mu, lv = vae.encode_image(x)
    print("posterior sigma (standardized) mean", (0.5 * lv).exp().mean().item())
    for s in [0, 0.05, 0.1, 0.2, 0.3, 0.5]:
        z = mu + s * torch.randn(mu.shape, generator=g)
        p = classify_batch(vae.decode_image(z).clamp(-1, 1))
        print(s, "shape", np.mean([q.shape == r["shape"] for q, r in zip(p, recs)]), "colour", np.mean([q.colour == r["colour"] for q, r in zip(p, recs)]))
