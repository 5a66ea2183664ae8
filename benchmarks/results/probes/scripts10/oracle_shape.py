# Tenth-session one-off probe (a record of how benchmarks/demo_results.md's numbers were made; not
# maintained or tested): how much a Bayes-optimal denoiser of the demo's images uses the
# shape word. For held-out scenes, the exact posterior mean of the clean latents under each caption
# is computed over a grid of the renderer's jitter (the only randomness a caption leaves), and its
# error with the true shape is compared with the error with the next shape, and with no shape.
# Run from the repo root: .venv/bin/python oracle_shape.py RUN [N_SCENES] [N_JITTER]
import sys, json, io, numpy as np, torch
sys.path.insert(0, ".")
from pathlib import Path
from PIL import Image
from mdm_dist.eval.heldout import heldout_records, EVAL_SPLIT
from mdm_dist.data.vae_checkpoint import load_vae_checkpoint
from mdm_dist.data.raw import decode_image, to_tensor_range
from mdm_dist.data.shapes import SCENE_TEMPLATES, SHAPES, SceneSpec, random_scene, render_scene
torch.set_num_threads(2)
run = Path(sys.argv[1]); n_scenes = int(sys.argv[2]) if len(sys.argv) > 2 else 40; n_jit = int(sys.argv[3]) if len(sys.argv) > 3 else 128
vae, cfg, _ = load_vae_checkpoint(run / "vae/vae.pt")
manifest = json.loads((run / "corpus/manifest.json").read_text())
recs = heldout_records(run / "corpus", n_scenes)
size = manifest["image_size"]
def img(spec, rng):
    buf = io.BytesIO(); Image.fromarray(render_scene(spec, size, jitter=rng)).save(buf, format="PNG")
    return decode_image(buf.getvalue(), cfg.vae.image_size)[0]
@torch.no_grad()
def enc(images):
    x = to_tensor_range(np.stack(images))
    return vae.encode_image(x.float())[0].flatten(1).double()
abars = [0.05, 0.2, 0.42, 0.65, 0.9]
g = torch.Generator().manual_seed(0)
acc = {a: {"true": [], "swap": [], "blind": []} for a in abars}
for rec in recs:
    index = int(rec["key"].removeprefix("eval"))
    rng = np.random.default_rng([manifest["seed"], EVAL_SPLIT, index])
    spec = random_scene(rng); rng.integers(len(SCENE_TEMPLATES))
    x0 = enc([img(spec, rng)])[0]
    grid = {}
    for s in SHAPES:
        alt = SceneSpec(**{**spec.to_dict(), "shape": s})
        grid[s] = enc([img(alt, np.random.default_rng([7, j])) for j in range(n_jit)])  # same jitters for every shape
    swap = SHAPES[(SHAPES.index(spec.shape) + 1) % len(SHAPES)]
    allx = torch.cat([grid[s] for s in SHAPES])
    for a in abars:
        for _ in range(4):
            zt = a ** 0.5 * x0 + (1 - a) ** 0.5 * torch.randn(x0.shape, generator=g, dtype=torch.float64)
            def post(X):
                lw = -((zt - a ** 0.5 * X) ** 2).sum(-1) / (2 * (1 - a))
                return (torch.softmax(lw, 0)[:, None] * X).sum(0)
            acc[a]["true"].append(float(((post(grid[spec.shape]) - x0) ** 2).mean()))
            acc[a]["swap"].append(float(((post(grid[swap]) - x0) ** 2).mean()))
            acc[a]["blind"].append(float(((post(allx) - x0) ** 2).mean()))
out = {str(a): {"error_true": round(float(np.mean(v["true"])), 4),
                "swap_over_true": round(float(np.mean(v["swap"]) / np.mean(v["true"])), 3),
                "shape_blind_over_true": round(float(np.mean(v["blind"]) / np.mean(v["true"])), 3)} for a, v in acc.items()}
print(json.dumps({"scenes": n_scenes, "jitters": n_jit, "oracle": out}, indent=1))
