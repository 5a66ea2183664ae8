"""GPU checks of the model paths (run by benchmarks/gpu_check.sh; skipped without CUDA)."""

import pytest
import torch

from mdm_dist.config import load_config
from mdm_dist.models import attention as attn_mod
from mdm_dist.models.mdm import build_model

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


@pytest.mark.skipif(attn_mod._flash_attn_func is None, reason="flash-attn is not installed")
@pytest.mark.parametrize("shape", [(2, 257, 8, 64), (1, 4096, 16, 128)])
def test_flash_attention_matches_float64_reference(shape):
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(*shape, device="cuda", generator=g, dtype=torch.bfloat16) for _ in range(3))
    ref = attn_mod.attention(q.double(), k.double(), v.double(), "reference")
    out = attn_mod.attention(q, k, v, "flash")
    err = (out.double() - ref).norm() / ref.norm()
    assert err < 1e-2, err
    sdpa = attn_mod.attention(q, k, v, "sdpa")
    assert ((sdpa.double() - ref).norm() / ref.norm()) < 1e-2


def test_tiny_mdm_cuda_bf16_matches_cpu_fp32():
    cfg = load_config("configs/tiny_hybrid.yaml")
    torch.manual_seed(0)
    cpu = build_model(cfg)
    with torch.no_grad():
        for head in (cpu.backbone.txt_out, cpu.backbone.img_out):
            head.weight.normal_(std=0.1)
    gpu = build_model(cfg, device="cuda")
    gpu.load_state_dict(cpu.state_dict())
    b, n = 4, cpu.vae.num_image_tokens
    inp = dict(txt=torch.randn(b, cfg.vae.max_text_len, cfg.vae.d_z), img=torch.randn(b, n, cfg.vae.d_z),
               t_txt=torch.rand(b), t_img=torch.rand(b), category=torch.zeros(b, dtype=torch.long))
    ref = cpu.backbone(**inp)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = gpu.backbone(**{k: v.cuda() for k, v in inp.items()})
    for o, r in zip(out, ref):
        assert ((o.float().cpu() - r).norm() / r.norm()) < 5e-2
