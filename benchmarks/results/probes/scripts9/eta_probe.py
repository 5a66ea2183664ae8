# Ninth-session one-off probe (a record of how benchmarks/demo_results.md's numbers were made; not
# maintained or tested). Run from the repo root: .venv/bin/python eta_probe.py ARGS (see demo_results.md).
import sys, json, numpy as np, torch
sys.path.insert(0, ".")
from pathlib import Path
import mdm_dist.diffusion.samplers as S
from mdm_dist.eval.heldout import load_mdm, heldout_records, heldout_images, evaluate
from mdm_dist.data.tokenizer import CaptionTokenizer
from mdm_dist.data.vae_checkpoint import load_vae_checkpoint
torch.set_num_threads(2)
run = Path(sys.argv[1]); weights = sys.argv[2] if len(sys.argv) > 2 else "raw"
model, cfg = load_mdm(run / "run/export", weights); vae, _, _ = load_vae_checkpoint(run / "vae/vae.pt")
tok = CaptionTokenizer(run / "tokenizer"); recs = heldout_records(run / "corpus", 100)
images = heldout_images(run / "corpus", recs, cfg.vae.image_size)
orig = S.ddim_step
G = {"g": None, "eta": 0.0}
def ddim_eta(z, eps_hat, t, s, vp):
    a_t, a_s = float(vp.alpha_bar(t)), float(vp.alpha_bar(s))
    x0 = (z - (1 - a_t) ** 0.5 * eps_hat) / a_t ** 0.5
    c = G["eta"] * ((1 - a_s) / (1 - a_t)) ** 0.5 * (1 - a_t / a_s) ** 0.5
    c = min(c, (1 - a_s) ** 0.5)
    return a_s ** 0.5 * x0 + max(1 - a_s - c * c, 0) ** 0.5 * eps_hat + c * torch.randn(z.shape, generator=G["g"], dtype=z.dtype)
S.ddim_step = ddim_eta
for eta, steps in [(0.0, 25), (1.0, 25), (1.0, 50), (1.0, 100), (0.5, 50)]:
    G["eta"] = eta; G["g"] = torch.Generator().manual_seed(7)
    res = []
    for seed in (0, 1):
        q, _ = evaluate(model, vae, tok, recs, images, steps, None, "ddim", seed)
        res.append((q["text_to_image"], q["text_to_image_colour"], q["text_to_image_shape"]))
    print(json.dumps({"eta": eta, "steps": steps, "weights": weights, "t2i/colour/shape seeds 0,1": res}), flush=True)
