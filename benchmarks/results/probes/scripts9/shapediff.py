# Ninth-session one-off probe (a record of how benchmarks/demo_results.md's numbers were made; not
# maintained or tested). Run from the repo root: .venv/bin/python shapediff.py ARGS (see demo_results.md).
import sys, dataclasses, numpy as np, torch
sys.path.insert(0, ".")
from pathlib import Path
from mdm_dist.data.vae_checkpoint import load_vae_checkpoint
from mdm_dist.data.shapes import random_scene, render_scene, SHAPES
from PIL import Image
run = Path(sys.argv[1]); vae, _, _ = load_vae_checkpoint(run / "vae/vae.pt")
A, B = [], []
for i in range(1000):
    rng = np.random.default_rng([9, 0, i]); s = random_scene(rng); st = rng.bit_generator.state
    im = render_scene(s, 64, jitter=rng); rng.bit_generator.state = st
    s2 = dataclasses.replace(s, shape=SHAPES[(SHAPES.index(s.shape) + 1) % 4]); im2 = render_scene(s2, 64, jitter=rng)
    f = lambda a: np.asarray(Image.fromarray(a).resize((32, 32), Image.BICUBIC))
    A.append(f(im)); B.append(f(im2))
t = lambda X: torch.tensor(np.stack(X)).permute(0, 3, 1, 2).float() / 127.5 - 1
with torch.no_grad(): ma, _ = vae.encode_image(t(A)); mb, _ = vae.encode_image(t(B))
print("per-dim latent MSE between shapes (same everything else):", ((ma - mb) ** 2).mean().item())
print("per-dim latent variance overall:", ma.var(0).mean().item())
