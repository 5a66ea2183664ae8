# Tenth-session one-off probe (a record of how benchmarks/demo_results.md's numbers were made; not
# maintained or tested): autoguidance (Karras et al. 2024) with an earlier checkpoint of the
# same run as the guiding model: v = v_bad + w (v_good - v_bad), per CFG half.
# Run from the repo root: .venv/bin/python autoguide.py RUN "STEP:W:CFG ..." [SEEDS]
import sys, json, copy, torch
sys.path.insert(0, ".")
from pathlib import Path
from torch import nn
from mdm_dist.eval.heldout import load_mdm, heldout_records, heldout_images, evaluate
from mdm_dist.data.tokenizer import CaptionTokenizer
from mdm_dist.data.vae_checkpoint import load_vae_checkpoint
from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
torch.set_num_threads(2)
run = Path(sys.argv[1]); grid = sys.argv[2].split(); seeds = [int(s) for s in (sys.argv[3] if len(sys.argv) > 3 else "0").split(",")]
good, cfg = load_mdm(run / "run/export"); vae, _, _ = load_vae_checkpoint(run / "vae/vae.pt")
tok = CaptionTokenizer(run / "tokenizer"); recs = heldout_records(run / "corpus", 100)
images = heldout_images(run / "corpus", recs, cfg.vae.image_size)
bads = {}
def bad_model(step):
    if step not in bads:
        sd = get_fp32_state_dict_from_zero_checkpoint(str(run / "run/checkpoints"), tag=f"step_{step:08d}")
        m = copy.deepcopy(good)
        m.load_state_dict({k[len("mdm."):]: v for k, v in sd.items()}, strict=False)
        bads[step] = m.eval()
    return bads[step]
class AutoGuided(nn.Module):
    def __init__(self, g, b, w):
        super().__init__(); self.g, self.b, self.w = g, b, w
    def forward(self, *a, **kw):
        tg, ig = self.g(*a, **kw)
        if self.w == 1.0:
            return tg, ig
        _, ib = self.b(*a, **kw)
        return tg, ib + self.w * (ig - ib)
for spec in grid:
    step, w, g = spec.split(":"); step, w, g = int(step), float(w), float(g)
    m = copy.copy(good)  # shallow: share the VAE and config
    m._modules = dict(good._modules)
    m._modules["backbone"] = AutoGuided(good.backbone, bad_model(step).backbone if w != 1.0 else None, w)
    res = []
    for seed in seeds:
        q, _ = evaluate(m, vae, tok, recs, images, None, g, None, seed, caption_guidance=1.0)
        res.append((q["text_to_image"], q["text_to_image_colour"], q["text_to_image_shape"]))
    print(json.dumps({"bad_step": step, "w_auto": w, "cfg": g, "t2i/colour/shape per seed": res}), flush=True)
