"""Thirteenth-session one-off probe (a record of how benchmarks/demo_results.md's numbers were made; not
maintained or tested): negative-prompt guidance on the shape word, on demo_v12.
Run from the repo root: .venv/bin/python negguide.py (writes /tmp/p13/negguide.json)."""
import json, sys, time
from pathlib import Path
import numpy as np, torch
from mdm_dist.eval.heldout import load_mdm, heldout_records
from mdm_dist.data.tokenizer import CaptionTokenizer
from mdm_dist.data.vae_checkpoint import load_vae_checkpoint
from mdm_dist.diffusion.samplers import one_token_time
from mdm_dist.diffusion.schedules import from_config
from mdm_dist.data.shapes import SHAPES
from mdm_dist.eval.classifier import classify_batch
torch.set_num_threads(2)
D = Path("/work/main/outputs/demo_v12")
model, cfg = load_mdm(D / "run/export", "raw")
vae, _, _ = load_vae_checkpoint(str(D / "vae/vae.pt"))
tok = CaptionTokenizer(str(D / "tokenizer"))
recs = heldout_records(D / "corpus", 100)
L = cfg.vae.max_text_len; v = cfg.vae; d = cfg.diffusion
vp = from_config(d).vp
B = len(recs)
enc = lambda caps: torch.from_numpy(np.stack([tok.encode_fixed(c, L) for c in caps])).long()
ids = enc([r["caption"] for r in recs])
# negatives: other shapes swapped in
negs = []
for k in range(1, len(SHAPES)):
    caps = []
    for r in recs:
        o = SHAPES[(SHAPES.index(r["shape"]) + k) % len(SHAPES)]
        c = r["caption"].replace(r["shape"], o)
        assert c != r["caption"]
        caps.append(c)
    negs.append(enc(caps))
# masked shape word
shape_ids = {s: tok.encode_fixed(s, 3) for s in SHAPES}
print({s: shape_ids[s][:3] for s in SHAPES})
masked = ids.clone()
for j in range(B):
    diff = (ids[j] != negs[0][j]).nonzero().flatten()
    masked[j, diff] = v.mask_id
tmask = one_token_time(d, L)
bb, vm = model.backbone, model.vae
model.eval()
def txtlat(x): return vm.encode_text(x)[0]
C = txtlat(ids); U = txtlat(torch.full_like(ids, v.mask_id)); NEG = [txtlat(n) for n in negs]; M = txtlat(masked)

@torch.no_grad()
def run(w, wn, kind, steps=25, seed=0):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(B, vae.num_image_tokens if hasattr(vae,'num_image_tokens') else 16, v.d_z, generator=g)
    ts = torch.linspace(1.0, d.t_eps, steps + 1, dtype=torch.float64).tolist()
    cat = torch.zeros(B, dtype=torch.long)
    for i in range(steps):
        t, s = ts[i], ts[i + 1]
        txts = [C, U]; tt = [0.0, 1.0]; cats = [cat, torch.full_like(cat, cfg.model.num_categories)]
        if kind == "swap":
            txts += NEG; tt += [0.0] * len(NEG); cats += [cat] * len(NEG)
        elif kind == "mask":
            txts += [M]; tt += [tmask]; cats += [cat]
        k = len(txts)
        one = torch.ones(B)
        _, out = bb(torch.cat(txts), z.repeat(k, 1, 1), torch.cat([one * x for x in tt]), one.repeat(k) * t, torch.cat(cats))
        out = out.float().view(k, B, *z.shape[1:])
        vc, vu = out[0], out[1]
        pred = vu + w * (vc - vu)
        if k > 2:
            vn = out[2:].mean(0)
            pred = pred + wn * (vc - vn)
        a = float(vp.alpha_bar(t)); sg = float(vp.sigma(t))
        eps = a ** 0.5 * pred + sg * z
        x0 = (z - sg * eps) / a ** 0.5
        z = float(vp.alpha_bar(s)) ** 0.5 * x0 + float(vp.sigma(s)) * eps
    preds = classify_batch(vae.decode_image(z.float()).clamp(-1, 1))
    ok = np.mean([p.matches(r["colour"], r["shape"]) for p, r in zip(preds, recs)])
    col = np.mean([p.colour == r["colour"] for p, r in zip(preds, recs)])
    shp = np.mean([p.shape == r["shape"] for p, r in zip(preds, recs)])
    return dict(w=w, wn=wn, kind=kind, seed=seed, t2i=ok, colour=col, shape=shp)
res = []
for args in [(2, 0, "none"), (2, 2, "swap"), (2, 5, "swap"), (2, 10, "swap"), (2, 5, "mask"), (2, 10, "mask"), (2, 20, "swap")]:
    t0 = time.time(); r = run(*args); r["s"] = round(time.time() - t0, 1); print(r, flush=True); res.append(r)
json.dump(res, open("/tmp/p13/negguide.json", "w"), indent=1)
