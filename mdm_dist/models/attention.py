"""Optional bidirectional self-attention blocks for hybrid Mamba/attention configs.

The paper's configs are pure Mamba. ``model.attention_every = k`` inserts one attention block
after every k Mamba blocks, as megatron-core's hybrid Mamba models interleave them. Attention runs
through flash-attn where it is installed and usable (CUDA, fp16/bf16), and through
``torch.nn.functional.scaled_dot_product_attention`` everywhere else; both compute the same
function (full, non-causal softmax attention).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

try:  # optional: GPU-only
    from flash_attn import flash_attn_func as _flash_attn_func
except Exception:  # ImportError, or a build without CUDA
    _flash_attn_func = None


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, backend: str = "auto") -> torch.Tensor:
    """Non-causal softmax attention. q, k, v: (batch, seqlen, heads, headdim) -> same shape.

    ``backend``: "auto" (flash-attn when installed, on CUDA, in fp16/bf16; else SDPA), "flash",
    "sdpa" or "reference" (explicit float math, for tests).
    """
    if backend not in ("auto", "flash", "sdpa", "reference"):
        raise ValueError(f"unknown attention backend {backend!r}; allowed: auto, flash, sdpa, reference")
    use_flash = _flash_attn_func is not None and q.is_cuda and q.dtype in (torch.float16, torch.bfloat16)
    if backend == "flash":
        if not use_flash:
            raise RuntimeError("flash-attn is not usable here (needs flash-attn installed, CUDA, fp16/bf16)")
        return _flash_attn_func(q, k, v, causal=False)
    if backend == "auto" and use_flash:
        return _flash_attn_func(q, k, v, causal=False)
    if backend == "reference":
        scale = 1.0 / math.sqrt(q.shape[-1])
        scores = torch.einsum("bqhd,bkhd->bhqk", q, k) * scale
        return torch.einsum("bhqk,bkhd->bqhd", scores.softmax(dim=-1), v)
    if q.device.type == "cpu" and q.dtype == torch.bfloat16:
        # CPU SDPA in bf16 is slower than in fp32 (its backward ~5x at the demo's sizes, while bf16
        # matmuls elsewhere are ~4x faster on CPUs with native bf16): compute it in fp32
        with torch.autocast("cpu", enabled=False):
            out = F.scaled_dot_product_attention(*(a.float().transpose(1, 2) for a in (q, k, v)))
        return out.transpose(1, 2).to(q.dtype)
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    return out.transpose(1, 2)


class SelfAttention(nn.Module):
    """Multi-head bidirectional self-attention: qkv projection, attention, output projection."""

    def __init__(self, d_model: int, n_heads: int, backend: str = "auto", device=None, dtype=None):
        super().__init__()
        if d_model % n_heads:
            raise ValueError(f"d_model {d_model} must be divisible by n_heads {n_heads}")
        self.n_heads = n_heads
        self.backend = backend
        self.qkv = nn.Linear(d_model, 3 * d_model, bias=False, device=device, dtype=dtype)
        self.out = nn.Linear(d_model, d_model, bias=False, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.n_heads, d // self.n_heads).unbind(dim=2)
        return self.out(attention(q, k, v, self.backend).reshape(b, t, d))


class AttentionBlock(nn.Module):
    """Pre-norm transformer block: x + attn(norm(x)), then x + mlp(norm(x)).

    ``adaln``: the block also takes a per-sample conditioning vector ``cond`` (B, d_model) and
    modulates both halves, DiT's adaLN with a zero-initialized map: ``norm(x) (1 + scale) + shift``
    in, ``(1 + gate)`` on the residual branch; at initialization the block computes as without."""

    def __init__(self, d_model: int, n_heads: int, mlp_ratio: float = 4.0, eps: float = 1e-5,
                 adaln: bool = False, device=None, dtype=None):
        super().__init__()
        self.ada = nn.Linear(d_model, 6 * d_model, device=device, dtype=dtype) if adaln else None
        hidden = int(mlp_ratio * d_model)
        self.norm1 = nn.RMSNorm(d_model, eps=eps, device=device, dtype=dtype)
        self.attn = SelfAttention(d_model, n_heads, device=device, dtype=dtype)
        self.norm2 = nn.RMSNorm(d_model, eps=eps, device=device, dtype=dtype)
        self.mlp = nn.Sequential(
            nn.Linear(d_model, hidden, device=device, dtype=dtype),
            nn.GELU(approximate="tanh"),
            nn.Linear(hidden, d_model, device=device, dtype=dtype),
        )

    def reset_parameters(self) -> None:
        if self.ada is not None:
            nn.init.zeros_(self.ada.weight)
            nn.init.zeros_(self.ada.bias)

    def forward(self, x: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        if self.ada is None:
            if cond is not None:
                raise ValueError("cond given to an AttentionBlock built without adaln")
            x = x + self.attn(self.norm1(x))
            return x + self.mlp(self.norm2(x))
        if cond is None:
            raise ValueError("an AttentionBlock built with adaln needs cond (B, d_model)")
        sh1, sc1, g1, sh2, sc2, g2 = self.ada(F.silu(cond)).unsqueeze(1).chunk(6, dim=-1)
        x = x + (1 + g1) * self.attn(self.norm1(x) * (1 + sc1) + sh1)
        return x + (1 + g2) * self.mlp(self.norm2(x) * (1 + sc2) + sh2)
