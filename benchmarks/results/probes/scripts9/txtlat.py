# Ninth-session one-off probe (a record of how benchmarks/demo_results.md's numbers were made; not
# maintained or tested). Run from the repo root: .venv/bin/python txtlat.py ARGS (see demo_results.md).
import sys, numpy as np, torch
sys.path.insert(0, ".")
from pathlib import Path
from mdm_dist.data.tokenizer import CaptionTokenizer
from mdm_dist.data.vae_checkpoint import load_vae_checkpoint
run = Path(sys.argv[1]); vae, _, _ = load_vae_checkpoint(run / "vae/vae.pt"); tok = CaptionTokenizer(run / "tokenizer")
words = ["a red circle on the left", "a red square on the left", "a red triangle on the left", "a red cross on the left",
         "a blue circle on the left", "a green circle on the left", "a yellow circle on the left", "a red circle on the right", "a red circle on the center"]
L = 12
ids = torch.from_numpy(np.stack([tok.encode_fixed(w, L) for w in words])).long()
print([tok.decode([int(i)]) for i in ids[0]]); print(ids[:4])
with torch.no_grad():
    mu, lv = vae.encode_text(ids)
sig = (0.5 * lv).exp()
print("mean sigma", sig.mean().item(), "mu norm per token", mu.norm(dim=-1).mean().item())
base = mu[0]
for i, w in enumerate(words[1:], 1):
    d = (mu[i] - base).norm(dim=-1)
    j = d.argmax().item()
    print(f"{w:35s} max token dist {d.max().item():.2f} at pos {j}; sigma there {sig[i, j].norm().item():.3f}")
