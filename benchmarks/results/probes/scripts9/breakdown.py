# Ninth-session one-off probe (a record of how benchmarks/demo_results.md's numbers were made; not
# maintained or tested). Run from the repo root: .venv/bin/python breakdown.py ARGS (see demo_results.md).
import sys, numpy as np, torch, collections
sys.path.insert(0, ".")
from pathlib import Path
from mdm_dist.eval.heldout import load_mdm, heldout_records
from mdm_dist.eval.classifier import classify_batch
from mdm_dist.data.tokenizer import CaptionTokenizer
from mdm_dist.data.vae_checkpoint import load_vae_checkpoint
from mdm_dist.data.shapes import random_scene, SCENE_TEMPLATES, SHAPES, COLOURS, SIZES, POSITIONS, BACKGROUNDS
from mdm_dist.diffusion import sample
torch.set_num_threads(2)
run = Path(sys.argv[1]); model, cfg = load_mdm(run / "run/export")
vae, _, _ = load_vae_checkpoint(run / "vae/vae.pt"); tok = CaptionTokenizer(run / "tokenizer")
L = cfg.vae.max_text_len
# all combos of shape x count x size, fixed colour/bg/position variety
recs = []
rng = np.random.default_rng(0)
for shape in SHAPES:
    for count in (1, 2, 3):
        for size in SIZES:
            for k in range(6):
                from mdm_dist.data.shapes import SceneSpec
                s = SceneSpec(colour=str(rng.choice(list(COLOURS))), shape=shape, size=size, position=str(rng.choice(POSITIONS)),
                              background=str(rng.choice(list(BACKGROUNDS))), count=count)
                recs.append((s, s.caption(int(rng.integers(len(SCENE_TEMPLATES))))))
ids = torch.from_numpy(np.stack([tok.encode_fixed(c, L) for _, c in recs])).long()
out = sample(model, "t2i", ids=ids, generator=torch.Generator().manual_seed(0))
imgs = vae.decode_image(out["img_latents"].float()).clamp(-1, 1)
preds = classify_batch(imgs)
acc = collections.defaultdict(list); conf = collections.Counter()
for (s, c), p in zip(recs, preds):
    acc[("count", s.count)].append(p.shape == s.shape); acc[("size", s.size)].append(p.shape == s.shape)
    acc[("shape", s.shape)].append(p.shape == s.shape); acc[("cs", s.count, s.size)].append(p.shape == s.shape)
    conf[(s.shape, p.shape)] += 1
for k in sorted(acc, key=str): print(k, round(np.mean(acc[k]), 2), len(acc[k]))
print("confusion (true -> seen):")
for sh in SHAPES: print(sh, {p: conf[(sh, p)] for p in SHAPES})
from mdm_dist.viz import image_grid
idx = [i for i, (s, c) in enumerate(recs) if s.count == 1 and s.size == "large"]
image_grid(imgs[idx], "/tmp/diag/large1.png", ncol=6, labels=[f"{recs[i][0].shape} -> {preds[i].shape}" for i in idx])
