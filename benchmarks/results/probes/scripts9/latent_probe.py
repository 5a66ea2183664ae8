# Ninth-session one-off probe (a record of how benchmarks/demo_results.md's numbers were made; not
# maintained or tested). Run from the repo root: .venv/bin/python latent_probe.py ARGS (see demo_results.md).
import sys, numpy as np, torch
sys.path.insert(0, ".")
from mdm_dist.data.shapes import random_scene, render_scene, SHAPES, COLOURS
from mdm_dist.data.vae_checkpoint import load_vae_checkpoint
torch.set_num_threads(2)
vae, _, _ = load_vae_checkpoint(sys.argv[1]); vae.eval()
def data(n, split):
    X, ys, yc = [], [], []
    for i in range(n):
        rng = np.random.default_rng([7, split, i]); s = random_scene(rng)
        img = render_scene(s, 64, jitter=rng)
        from PIL import Image
        img = np.asarray(Image.fromarray(img).resize((32, 32), Image.BICUBIC))
        X.append(img); ys.append(SHAPES.index(s.shape)); yc.append(list(COLOURS).index(s.colour))
    x = torch.tensor(np.stack(X)).permute(0, 3, 1, 2).float() / 127.5 - 1
    return x, torch.tensor(ys), torch.tensor(yc)
def feats(x):
    with torch.no_grad():
        conv = vae.image_encoder(x)
        mu, _ = vae.encode_image(x)
    return {"pixels": x.flatten(1), "conv": conv.flatten(1), "z": mu.flatten(1)}
def linprobe(Xtr, ytr, Xte, yte, k, lam=1e-3):
    m, s = Xtr.mean(0), Xtr.std(0) + 1e-6
    Xtr, Xte = (Xtr - m) / s, (Xte - m) / s
    W = torch.zeros(Xtr.shape[1], k, requires_grad=True); b = torch.zeros(k, requires_grad=True)
    opt = torch.optim.LBFGS([W, b], max_iter=300, line_search_fn="strong_wolfe")
    def clo():
        opt.zero_grad(); l = torch.nn.functional.cross_entropy(Xtr @ W + b, ytr) + lam * (W ** 2).sum(); l.backward(); return l
    opt.step(clo)
    return ((Xte @ W + b).argmax(1) == yte).float().mean().item()
def mlpprobe(Xtr, ytr, Xte, yte, k):
    m, s = Xtr.mean(0), Xtr.std(0) + 1e-6
    Xtr, Xte = (Xtr - m) / s, (Xte - m) / s
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(Xtr.shape[1], 256), torch.nn.GELU(), torch.nn.Linear(256, k))
    opt = torch.optim.AdamW(net.parameters(), 1e-3, weight_decay=0.05)
    for ep in range(60):
        perm = torch.randperm(len(Xtr))
        for i in range(0, len(Xtr), 128):
            j = perm[i:i+128]; l = torch.nn.functional.cross_entropy(net(Xtr[j]), ytr[j]); opt.zero_grad(); l.backward(); opt.step()
    with torch.no_grad(): return (net(Xte).argmax(1) == yte).float().mean().item()
xtr, str_, ctr = data(4000, 0); xte, ste, cte = data(1000, 1)
ftr, fte = feats(xtr), feats(xte)
for name in ftr:
    print(name, ftr[name].shape[1], "shape lin %.3f" % linprobe(ftr[name], str_, fte[name], ste, 4),
          "mlp %.3f" % mlpprobe(ftr[name], str_, fte[name], ste, 4),
          "colour lin %.3f" % linprobe(ftr[name], ctr, fte[name], cte, 6), flush=True)
