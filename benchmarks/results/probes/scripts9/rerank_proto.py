# Ninth-session one-off probe (a record of how benchmarks/demo_results.md's numbers were made; not
# maintained or tested). Run from the repo root: .venv/bin/python rerank_proto.py ARGS (see demo_results.md).
import sys, time, json, numpy as np, torch
sys.path.insert(0, ".")
from pathlib import Path
from mdm_dist.eval.heldout import load_mdm, heldout_records, heldout_images
from mdm_dist.eval.classifier import classify_batch
from mdm_dist.data.tokenizer import CaptionTokenizer
from mdm_dist.data.vae_checkpoint import load_vae_checkpoint
from mdm_dist.diffusion import sample
torch.set_num_threads(2)
run = Path(sys.argv[1]); N = int(sys.argv[2]); nump = int(sys.argv[3]) if len(sys.argv) > 3 else 100
model, cfg = load_mdm(run / "run/export")
vae, _, _ = load_vae_checkpoint(run / "vae/vae.pt"); tok = CaptionTokenizer(run / "tokenizer")
recs = heldout_records(run / "corpus", nump)
L = cfg.vae.max_text_len; mask_id = cfg.vae.mask_id
ids = torch.from_numpy(np.stack([tok.encode_fixed(r["caption"], L) for r in recs])).long()
b = len(recs)

@torch.no_grad()
def score(lat, ids, levels=(1.0,), seed=5):
    """sum over masked positions of log p(true id | image lat clean, text partly masked)"""
    bb = model.backbone
    g = torch.Generator().manual_seed(seed)
    tot = torch.zeros(lat.shape[0])
    for lv in levels:
        m = torch.rand(ids.shape, generator=g) < lv if lv < 1 else torch.ones_like(ids, dtype=torch.bool)
        x = torch.where(m, torch.full_like(ids, mask_id), ids)
        z_txt, _ = model.vae.encode_text(x)  # mu (deterministic)
        t_txt = torch.full((lat.shape[0],), float(lv)); t_img = torch.zeros(lat.shape[0])
        cat = torch.zeros(lat.shape[0], dtype=torch.long)
        txt_out, _ = bb(z_txt, lat, t_txt, t_img, cat)
        lp = model.vae.decode_text(txt_out).float()
        lp[..., mask_id] = float("-inf"); lp = lp.log_softmax(-1)
        tl = lp.gather(-1, ids[..., None])[..., 0]
        tot += (tl * m).sum(1)
    return tot

cands, t0 = [], time.time()
for k in range(N):
    out = sample(model, "t2i", ids=ids, generator=torch.Generator().manual_seed(100 + k))
    imgs = vae.decode_image(out["img_latents"].float()).clamp(-1, 1)
    mu, _ = vae.encode_image(imgs)
    preds = classify_batch(imgs)
    ok = torch.tensor([p.matches(r["colour"], r["shape"]) for p, r in zip(preds, recs)])
    okc = torch.tensor([p.colour == r["colour"] for p, r in zip(preds, recs)])
    oks = torch.tensor([p.shape == r["shape"] for p, r in zip(preds, recs)])
    s1 = score(mu, ids); s4 = score(mu, ids, (1.0, 0.75, 0.5, 0.25)); sg = score(out["img_latents"].float(), ids)
    cands.append(dict(ok=ok, okc=okc, oks=oks, s1=s1, s4=s4, sg=sg))
    print(k, "single", ok.float().mean().item(), "shape", oks.float().mean().item(), round(time.time() - t0), flush=True)
OK = torch.stack([c["ok"] for c in cands]); OKS = torch.stack([c["oks"] for c in cands])
print("mean single", OK.float().mean().item(), "shape", OKS.float().mean().item())
for n in [2, 4, 8, 16]:
    if n > N: break
    res = {"oracle": OK[:n].any(0).float().mean().item()}
    for key in ("s1", "s4", "sg"):
        S = torch.stack([c[key] for c in cands])[:n]
        best = S.argmax(0)
        res[key] = OK[:n][best, torch.arange(b)].float().mean().item()
        res[key + "_shape"] = OKS[:n][best, torch.arange(b)].float().mean().item()
    print(n, json.dumps(res), flush=True)
