# Tenth-session one-off probe (a record of how benchmarks/demo_results.md's numbers were made; not
# maintained or tested): the demo model's clean-latent error on training scenes against held-out
# ones, at the noise-level probe's times. Run from the repo root: .venv/bin/python train_vs_heldout.py RUN
import sys, io, json, numpy as np, torch
sys.path.insert(0, "."); sys.path.insert(0, "data_prep")
from pathlib import Path
from PIL import Image
from make_demo_data import draw, TRAIN
from mdm_dist.eval.heldout import load_mdm, heldout_records, heldout_images
from mdm_dist.eval.conditioning import caption_word_reliance
from mdm_dist.data.vae_checkpoint import load_vae_checkpoint
from mdm_dist.data.tokenizer import CaptionTokenizer
from mdm_dist.data.raw import decode_image, to_tensor_range
torch.set_num_threads(1)
run = Path(sys.argv[1]); n = 100
model, cfg = load_mdm(run / "run/export"); vae, _, _ = load_vae_checkpoint(run / "vae/vae.pt")
tok = CaptionTokenizer(run / "tokenizer"); man = json.loads((run / "corpus/manifest.json").read_text())
recs = heldout_records(run / "corpus", n)
sets = {"heldout": (heldout_images(run / "corpus", recs, cfg.vae.image_size), [r["caption"] for r in recs])}
imgs, caps = [], []
for i in range(n):
    spec, tmpl, cap, im = draw(man["seed"], TRAIN, i, man["image_size"])
    buf = io.BytesIO(); Image.fromarray(im).save(buf, format="PNG")
    imgs.append(decode_image(buf.getvalue(), cfg.vae.image_size)[0]); caps.append(cap)
sets["train"] = (np.stack(imgs), caps)
times = (0.2, 0.4, 0.55, 0.7, 0.85, 1.0)
out = {}
with torch.no_grad():
    for name, (ims, cs) in sets.items():
        z0, _ = vae.encode_image(to_tensor_range(ims))
        ids = torch.from_numpy(np.stack([tok.encode_fixed(c, cfg.vae.max_text_len) for c in cs])).long()
        rows = caption_word_reliance(model, cfg, z0, {"true": ids}, times, seed=0)
        out[name] = {round(r["alpha_bar"], 2): round(r["true"], 4) for r in rows}
print(json.dumps(out))
