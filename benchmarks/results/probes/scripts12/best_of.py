"""Best-of-n on demo_v12 (twelfth session, benchmarks/demo_results.md): 100 held-out prompts x 8
candidates, each scored by the library's caption_pseudo_log_likelihood ("full" below: text time of
one masked token in L) and by the same pseudo-log-likelihood at text time 0.5 ("pll"), and read by
the pixel classifier.  .venv/bin/python best_of.py 8"""
import json, sys, time
from pathlib import Path
import numpy as np, torch
from mdm_dist.eval.heldout import load_mdm, heldout_records
from mdm_dist.data.tokenizer import CaptionTokenizer
from mdm_dist.data.vae_checkpoint import load_vae_checkpoint
from mdm_dist.diffusion import sample, caption_pseudo_log_likelihood
from mdm_dist.eval.classifier import classify_batch

torch.set_num_threads(2)
D = Path("/work/main/outputs/demo_v12")
model, cfg = load_mdm(D / "run/export", "raw")
vae, _, _ = load_vae_checkpoint(str(D / "vae/vae.pt"))
tok = CaptionTokenizer(str(D / "tokenizer"))
recs = heldout_records(D / "corpus", 100)
n = int(sys.argv[1]) if len(sys.argv) > 1 else 8
L = cfg.vae.max_text_len
ids = torch.from_numpy(np.stack([tok.encode_fixed(r["caption"], L) for r in recs])).long()
rep = ids.repeat_interleave(n, 0)
t0 = time.time()
out = sample(model, "t2i", ids=rep, guidance_scale=2.0, generator=torch.Generator().manual_seed(0))
print("sample", time.time() - t0, flush=True)
z = out["img_latents"]
t0 = time.time()
full = caption_pseudo_log_likelihood(model, z, rep).view(100, n)  # the library's (t = one token in L)
print("full", time.time() - t0, flush=True)

@torch.no_grad()
def pll(model, z, ids):
    v = cfg.vae
    vaem, bb = model.vae, model.backbone
    b = ids.shape[0]
    tot = torch.zeros(b, dtype=torch.float64)
    ones = torch.ones(b)
    for i in range(L):
        x = ids.clone(); x[:, i] = v.mask_id
        txt = vaem.encode_text(x)[0]
        t_txt = ones * 0.5  # hmm: time of a 1-of-L masked caption
        o, _ = bb(txt, z, t_txt, ones * 0.0, torch.zeros(b, dtype=torch.long))
        lg = vaem.decode_text(o).double(); lg[..., v.mask_id] = float("-inf")
        tot += lg.log_softmax(-1)[torch.arange(b), i, ids[:, i]]
    return tot

model.eval()
t0 = time.time()
p = pll(model, z, rep).view(100, n)
print("pll", time.time() - t0, flush=True)
preds = classify_batch(vae.decode_image(z.float()).clamp(-1, 1))
ok = torch.tensor([pr.matches(r["colour"], r["shape"]) for pr, r in zip(preds, [r for r in recs for _ in range(n)])]).view(100, n).float()
shp = torch.tensor([pr.shape == r["shape"] for pr, r in zip(preds, [r for r in recs for _ in range(n)])]).view(100, n).float()
print("plain", ok.mean().item(), "shape", shp.mean().item())
for k in (1, 2, 4, 8):
    if k > n: break
    for name, s in (("pll_lib", full), ("pll_t0.5", p)):
        c = s[:, :k].argmax(1)
        print(k, name, "t2i", ok[torch.arange(100), c].mean().item(), "shape", shp[torch.arange(100), c].mean().item(),
              "oracle any", ok[:, :k].max(1).values.mean().item())
torch.save({"z": z, "full": full, "pll": p, "ok": ok, "shp": shp}, "best_of_demo_v12.pt")  # summarized in ../best_of_demo_v12.json
