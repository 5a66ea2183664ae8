"""Attention blocks: the SDPA path against an explicit float64 softmax attention."""

import math

import pytest
import torch

from mdm_dist.models.attention import AttentionBlock, SelfAttention, attention


def _float64_attention(q, k, v):
    q, k, v = (t.double() for t in (q, k, v))
    b, t, h, d = q.shape
    out = torch.zeros_like(q)
    for bi in range(b):
        for hi in range(h):
            s = q[bi, :, hi] @ k[bi, :, hi].T / math.sqrt(d)
            p = torch.exp(s - s.max(dim=-1, keepdim=True).values)
            p = p / p.sum(dim=-1, keepdim=True)
            out[bi, :, hi] = p @ v[bi, :, hi]
    return out


@pytest.mark.parametrize("shape", [(2, 7, 3, 8), (1, 33, 2, 16)])
@pytest.mark.parametrize("backend", ["sdpa", "reference", "auto"])
def test_attention_matches_float64(shape, backend):
    g = torch.Generator().manual_seed(sum(shape))
    q, k, v = (torch.randn(*shape, generator=g) for _ in range(3))
    ref = _float64_attention(q, k, v)
    out = attention(q, k, v, backend)
    assert out.shape == q.shape
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)
    out64 = attention(q.double(), k.double(), v.double(), backend)
    torch.testing.assert_close(out64, ref, rtol=1e-10, atol=1e-10)


def test_cpu_bf16_attention_runs_in_fp32_under_autocast():
    """On CPU, bf16 q/k/v (as autocast makes them) are attended in fp32: the result is the fp32
    attention of the bf16 inputs rounded once to bf16, exactly, and gradients flow back in bf16."""
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(2, 33, 4, 32, generator=g).bfloat16().requires_grad_(True) for _ in range(3))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = attention(q, k, v, "sdpa")
    assert out.dtype == torch.bfloat16
    ref = attention(q.detach().float(), k.detach().float(), v.detach().float(), "sdpa").bfloat16()
    assert torch.equal(out, ref)
    torch.testing.assert_close(out.double(), _float64_attention(q.detach(), k.detach(), v.detach()),
                               rtol=1e-2, atol=1e-2)
    out.float().square().sum().backward()
    assert q.grad.dtype == torch.bfloat16 and q.grad.abs().sum() > 0


def test_attention_is_bidirectional():
    # Changing the last token changes the output at the first position (no causal mask).
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 5, 1, 4, generator=g) for _ in range(3))
    out1 = attention(q, k, v, "sdpa")
    v2 = v.clone()
    v2[:, -1] += 1.0
    assert not torch.allclose(out1[:, 0], attention(q, k, v2, "sdpa")[:, 0])


def test_flash_backend_refuses_cpu_and_bad_backend():
    q = torch.randn(1, 4, 2, 8)
    with pytest.raises(RuntimeError, match="flash-attn is not usable"):
        attention(q, q, q, "flash")
    with pytest.raises(ValueError, match="allowed: auto, flash, sdpa, reference"):
        attention(q, q, q, "xformers")


def test_attention_block_gradients_and_module_equivalence():
    torch.manual_seed(0)
    blk = AttentionBlock(16, 4).double()
    x = torch.randn(2, 6, 16, dtype=torch.float64, requires_grad=True)
    y = blk(x)
    y.square().sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in blk.parameters())
    # The module's attention equals an explicit qkv split + float64 attention.
    att: SelfAttention = blk.attn
    with torch.no_grad():
        h = torch.randn(2, 6, 16, dtype=torch.float64)
        q, k, v = att.qkv(h).view(2, 6, 3, 4, 4).unbind(2)
        ref = att.out(_float64_attention(q, k, v).reshape(2, 6, 16))
        torch.testing.assert_close(att(h), ref)
