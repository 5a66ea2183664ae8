# Ninth-session one-off probe (a record of how benchmarks/demo_results.md's numbers were made; not
# maintained or tested). Run from the repo root: .venv/bin/python selfguide.py ARGS (see demo_results.md).
import sys, json, numpy as np, torch
sys.path.insert(0, ".")
from pathlib import Path
from mdm_dist.eval.heldout import load_mdm, heldout_records
from mdm_dist.eval.classifier import classify_batch
from mdm_dist.data.tokenizer import CaptionTokenizer
from mdm_dist.data.vae_checkpoint import load_vae_checkpoint
from mdm_dist.diffusion.schedules import from_config
torch.set_num_threads(2)
run = Path(sys.argv[1]); model, cfg = load_mdm(run / "run/export")
vae, _, _ = load_vae_checkpoint(run / "vae/vae.pt"); tok = CaptionTokenizer(run / "tokenizer")
recs = heldout_records(run / "corpus", 100); L = cfg.vae.max_text_len; mid = cfg.vae.mask_id
ids = torch.from_numpy(np.stack([tok.encode_fixed(r["caption"], L) for r in recs])).long()
b = len(recs); N = model.vae.num_image_tokens; dz = cfg.vae.d_z
vp = from_config(cfg.diffusion).vp; bb = model.backbone
for p in model.parameters(): p.requires_grad_(False)
with torch.no_grad():
    zc, _ = model.vae.encode_text(ids)                     # clean prompt latents (mu)
    zu, _ = model.vae.encode_text(torch.full_like(ids, mid))  # all-mask
cat0 = torch.zeros(b, dtype=torch.long); null = torch.full((b,), cfg.model.num_categories)
def v_pred(z, t, w=2.0):
    with torch.no_grad():
        ones = torch.ones(b)
        _, out = bb(torch.cat([zc, zu]), torch.cat([z, z]), torch.cat([0 * ones, ones]), torch.cat([t * ones, t * ones]), torch.cat([cat0, null]))
        return out[b:] + w * (out[:b] - out[b:])
def caption_nll(x0):
    txt_out, _ = bb(zu, x0, torch.ones(b), torch.zeros(b), cat0)
    lp = model.vae.decode_text(txt_out).float(); lp[..., mid] = -1e9
    return -lp.log_softmax(-1).gather(-1, ids[..., None])[..., 0].sum(1)
def run_(lam, seed, steps=25, ab_max=0.7):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(b, N, dz, generator=g)
    ts = torch.linspace(1.0, cfg.diffusion.t_eps, steps + 1).tolist()
    for i in range(steps):
        t, s = ts[i], ts[i + 1]
        a_t, a_s = float(vp.alpha_bar(torch.tensor(t))), float(vp.alpha_bar(torch.tensor(s)))
        v = v_pred(z, t)
        x0 = a_t ** 0.5 * z - (1 - a_t) ** 0.5 * v
        eps = (1 - a_t) ** 0.5 * z + a_t ** 0.5 * v
        if lam > 0 and a_t < ab_max:
            x = x0.detach().requires_grad_(True)
            gr, = torch.autograd.grad(caption_nll(x).sum(), x)
            gr = gr / gr.pow(2).mean(dim=(1, 2), keepdim=True).sqrt().clamp_min(1e-8)
            x0 = x0 - lam * gr
            eps = (z - a_t ** 0.5 * x0) / (1 - a_t) ** 0.5
        z = a_s ** 0.5 * x0 + (1 - a_s) ** 0.5 * eps
    with torch.no_grad():
        imgs = vae.decode_image(z.float()).clamp(-1, 1)
    preds = classify_batch(imgs)
    ok = np.mean([p.matches(r["colour"], r["shape"]) for p, r in zip(preds, recs)])
    sh = np.mean([p.shape == r["shape"] for p, r in zip(preds, recs)]); co = np.mean([p.colour == r["colour"] for p, r in zip(preds, recs)])
    return round(ok, 2), round(co, 2), round(sh, 2), imgs
for lam in [float(x) for x in sys.argv[2].split(",")]:
    res = [run_(lam, sd)[:3] for sd in (0, 1)]
    print(json.dumps({"lambda": lam, "t2i/colour/shape seeds 0,1": res}), flush=True)
