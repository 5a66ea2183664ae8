"""Mamba2Mixer against an independent float64 sequential implementation, plus scan order,
packed sequences, gradients, fp32 parameters in a bf16 module, and meta-device construction;
its Triton path (ordering inside the conv and scan kernels, run in Triton's interpreter) against
its gathering CPU path, and the stacked multi-direction block against the per-direction loop."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from mdm_dist.config import ModelConfig
from mdm_dist.models.backbone import MambaBlock
from mdm_dist.models.mamba2 import Mamba2Mixer, RMSNormGated, keep_fp32_, mixers_forward_stacked
from test_ssd_triton import KERNEL_MODULES, _kernel_mode

F64 = torch.float64
SMALL = dict(d_model=16, d_state=4, d_conv=4, expand=2.0, headdim=8, ngroups=2, chunk_size=8)


def make_mixer(seed=0, dtype=F64, **kw):
    torch.manual_seed(seed)
    args = dict(SMALL, proj_bias=True)
    args.update(kw)
    m = Mamba2Mixer(**args)
    m.to(dtype)  # tests in float64 cast A_log/D/dt_bias too, for a tight comparison
    with torch.no_grad():  # make the conv and norm non-trivial
        m.norm.weight.uniform_(0.5, 1.5)
        m.D.uniform_(-1, 1)
    return m


def rel_err(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def mixer_sequential(m: Mamba2Mixer, u: torch.Tensor, seq_idx=None) -> torch.Tensor:
    """The mixer written out position by position in float64, independent of kernels.ssd."""
    u = u.double()
    Bsz, L, _ = u.shape
    H, P, G, N, K = m.nheads, m.headdim, m.ngroups, m.d_state, m.d_conv
    di = m.d_inner
    zxbcdt = u @ m.in_proj.weight.double().T
    if m.in_proj.bias is not None:
        zxbcdt = zxbcdt + m.in_proj.bias.double()
    z, xBC, dt = zxbcdt[..., :di], zxbcdt[..., di:di + m.conv_dim], zxbcdt[..., di + m.conv_dim:]
    if seq_idx is None:
        seq_idx = torch.zeros(Bsz, L, dtype=torch.long)
    w = m.conv1d.weight.double()[:, 0]  # (conv_dim, K)
    conv = torch.zeros_like(xBC)
    for b in range(Bsz):
        seg = 0
        segs = []
        for t in range(L):
            if t > 0 and seq_idx[b, t] != seq_idx[b, t - 1]:
                seg += 1
            segs.append(seg)
        for t in range(L):
            acc = m.conv1d.bias.double().clone() if m.conv1d.bias is not None else torch.zeros(m.conv_dim, dtype=F64)
            for k in range(K):
                src = t - (K - 1) + k
                if src >= 0 and segs[src] == segs[t]:
                    acc = acc + w[:, k] * xBC[b, src]
            conv[b, t] = acc
    xBC = F.silu(conv)
    x = xBC[..., :di].reshape(Bsz, L, H, P)
    Bm = xBC[..., di:di + G * N].reshape(Bsz, L, G, N)
    Cm = xBC[..., di + G * N:].reshape(Bsz, L, G, N)
    A = -torch.exp(m.A_log.double())
    dts = F.softplus(dt + m.dt_bias.double())
    Dp = m.D.double()
    y = torch.zeros(Bsz, L, H, P, dtype=F64)
    for b in range(Bsz):
        for h in range(H):
            g = h // (H // G)
            state = torch.zeros(P, N, dtype=F64)
            for t in range(L):
                if t > 0 and seq_idx[b, t] != seq_idx[b, t - 1]:
                    state = torch.zeros(P, N, dtype=F64)
                d = dts[b, t, h]
                state = torch.exp(d * A[h]) * state + d * torch.outer(x[b, t, h], Bm[b, t, g])
                y[b, t, h] = state @ Cm[b, t, g] + Dp[h] * x[b, t, h]
    y = y.reshape(Bsz, L, di) * F.silu(z)
    yg = y.reshape(Bsz, L, G, di // G)
    yg = yg / torch.sqrt(yg.pow(2).mean(-1, keepdim=True) + m.norm.eps)
    y = yg.reshape(Bsz, L, di) * m.norm.weight.double()
    out = y @ m.out_proj.weight.double().T
    if m.out_proj.bias is not None:
        out = out + m.out_proj.bias.double()
    return out


@pytest.mark.parametrize("backend", ["torch", "reference"])
def test_mixer_matches_sequential_float64(backend):
    m = make_mixer(seed=1, scan_backend=backend)
    u = torch.randn(2, 19, 16, dtype=F64)
    torch.testing.assert_close(m(u), mixer_sequential(m, u), rtol=1e-10, atol=1e-10)


def test_mixer_with_seq_idx_matches_sequential_and_separate_segments():
    m = make_mixer(seed=2)
    u = torch.randn(1, 21, 16, dtype=F64)
    lens = [6, 2, 13]
    seq_idx = torch.repeat_interleave(torch.arange(3), torch.tensor(lens))[None]
    out = m(u, seq_idx=seq_idx)
    torch.testing.assert_close(out, mixer_sequential(m, u, seq_idx), rtol=1e-10, atol=1e-10)
    parts = torch.cat([m(p) for p in u.split(lens, dim=1)], dim=1)  # conv and scan restart
    torch.testing.assert_close(out, parts, rtol=1e-10, atol=1e-10)


def test_scan_order_equals_permute_mixer_unpermute():
    m = make_mixer(seed=3)
    u = torch.randn(2, 23, 16, dtype=F64)
    perm = torch.randperm(23)
    seq_idx = torch.randint(0, 2, (2, 23)).sort(1).values
    expected = m(u[:, perm], seq_idx=seq_idx[:, perm])[:, perm.argsort()]
    torch.testing.assert_close(m(u, scan_order=perm, seq_idx=seq_idx), expected, rtol=1e-12, atol=1e-12)
    # and scanning the reverse direction really differs from the forward one
    assert not torch.allclose(m(u, scan_order=torch.arange(22, -1, -1)), m(u))


def test_gradient_reaches_every_parameter():
    m = make_mixer(seed=4, dtype=torch.float32)
    u = torch.randn(2, 17, 16, requires_grad=True)
    (m(u, scan_order=torch.randperm(17)).square().mean()).backward()
    for name, p in m.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name
    assert u.grad is not None and u.grad.abs().sum() > 0


def test_init_follows_mamba2():
    m = Mamba2Mixer(**SMALL, dt_min=1e-3, dt_max=1e-1, dt_init_floor=1e-4, A_init_range=(1.0, 16.0))
    dt = F.softplus(m.dt_bias)
    assert (dt >= 1e-3 * (1 - 1e-5)).all() and (dt <= 1e-1 * (1 + 1e-5)).all()
    A = torch.exp(m.A_log)
    assert (A >= 1.0).all() and (A <= 16.0).all()
    assert torch.equal(m.D, torch.ones_like(m.D))
    assert torch.equal(m.norm.weight, torch.ones_like(m.norm.weight))
    for name in ("A_log", "D", "dt_bias"):
        p = getattr(m, name)
        assert p.dtype == torch.float32 and p._mdm_keep_fp32 and p._no_weight_decay
    # in_proj packs [z | xBC | dt]
    assert m.in_proj.out_features == 2 * m.d_inner + 2 * m.ngroups * m.d_state + m.nheads


def test_fp32_parameters_survive_bfloat16_cast():
    m = Mamba2Mixer(**SMALL, dtype=torch.bfloat16)
    assert m.A_log.dtype == m.D.dtype == m.dt_bias.dtype == torch.float32  # built fp32
    assert m.in_proj.weight.dtype == torch.bfloat16
    ref = make_mixer(seed=5, dtype=torch.float32)
    m = make_mixer(seed=5, dtype=torch.float32)
    m.to(torch.bfloat16)  # casts everything ...
    keep_fp32_(m)  # ... and this restores the marked parameters
    for name in ("A_log", "D", "dt_bias"):
        assert getattr(m, name).dtype == torch.float32, name
    assert m.in_proj.weight.dtype == m.conv1d.weight.dtype == m.norm.weight.dtype == torch.bfloat16
    u = torch.randn(2, 30, 16)
    out = m(u.bfloat16(), seq_idx=torch.randint(0, 2, (2, 30)).sort(1).values)
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    out = m(u.bfloat16())
    assert rel_err(out, ref(u)) < 5e-2
    out.float().square().mean().backward()
    assert m.A_log.grad.dtype == torch.float32 and torch.isfinite(m.A_log.grad).all()


def test_meta_build_then_materialize():
    cfg = ModelConfig(d_model=32, d_state=8, headdim=16, ngroups=2, chunk_size=16)
    m = Mamba2Mixer.from_config(cfg, device="meta")
    assert all(p.is_meta for p in m.parameters())
    assert m.A_log.dtype == torch.float32
    m.to_empty(device="cpu")
    m.reset_parameters()
    assert all(torch.isfinite(p).all() for p in m.parameters())
    assert torch.equal(m.D, torch.ones_like(m.D))
    out = m(torch.randn(2, 37, 32))
    assert out.shape == (2, 37, 32) and torch.isfinite(out).all()


def test_from_config_reads_every_mixer_field():
    cfg = ModelConfig(d_model=48, d_state=6, d_conv=3, expand=1.5, headdim=12, ngroups=3, chunk_size=8,
                      A_init_range=[2.0, 4.0], conv_bias=False, proj_bias=True, norm_eps=1e-6,
                      scan_backend="reference")
    m = Mamba2Mixer.from_config(cfg)
    assert (m.d_inner, m.nheads, m.ngroups, m.d_state, m.d_conv) == (72, 6, 3, 6, 3)
    assert m.conv1d.bias is None and m.in_proj.bias is not None and m.norm.eps == 1e-6
    assert m.scan_backend == "reference" and m.chunk_size == 8 and m.A_init_range == (2.0, 4.0)
    assert Mamba2Mixer.from_config(cfg, chunk_size=4).chunk_size == 4  # kw overrides
    assert m(torch.randn(1, 5, 48)).shape == (1, 5, 48)


def test_rms_norm_gated_groups():
    norm = RMSNormGated(8, group_size=4, eps=0.0).double()
    x = torch.randn(3, 8, dtype=F64)
    z = torch.randn(3, 8, dtype=F64)
    h = x * z * torch.sigmoid(z)
    expected = torch.cat([g / g.pow(2).mean(-1, keepdim=True).sqrt() for g in h.split(4, -1)], -1)
    torch.testing.assert_close(norm(x, z), expected)


def test_bad_input_shapes():
    m = make_mixer()
    with pytest.raises(ValueError, match="u must have shape"):
        m(torch.randn(2, 5, 7, dtype=F64))
    with pytest.raises(ValueError, match="scan_order must have shape"):
        m(torch.randn(2, 5, 16, dtype=F64), scan_order=torch.arange(4))
    with pytest.raises(ValueError, match="divisible by headdim"):
        Mamba2Mixer(d_model=10, headdim=8)
    assert math.isfinite(m(torch.randn(1, 1, 16, dtype=F64)).sum().item())  # seqlen 1


# ----- the Triton path (ordering inside the kernels) against the gathering CPU path ------------
# The kernels run in Triton's interpreter (tests/test_ssd_triton.py explains ``_kernel_mode``).

TRITON_MODULES = KERNEL_MODULES + ("kernels.conv1d.triton_conv",)


def _with_grads(fn, modules, u, seed=9):
    """fn(u) and the gradients of a fixed random linear function of it: u's and every parameter's."""
    for m in modules:
        m.zero_grad()
    u = u.detach().clone().requires_grad_()
    out = fn(u)
    (out * torch.randn(out.shape, generator=torch.Generator().manual_seed(seed), dtype=out.dtype)).sum().backward()
    grads = {f"{i}.{n}": p.grad.clone() for i, m in enumerate(modules) for n, p in m.named_parameters()}
    return out.detach(), u.grad, grads


def _assert_same(a, b, tol):
    (oa, ua, ga), (ob, ub, gb) = a, b
    assert rel_err(oa, ob) < tol and rel_err(ua, ub) < tol
    assert ga.keys() == gb.keys()
    for name in ga:
        assert rel_err(ga[name], gb[name]) < tol, name


def test_ordered_path_with_torch_backends_equals_gathered_path_float64():
    m = make_mixer(seed=6)
    u = torch.randn(2, 19, 16, dtype=F64)
    perm = torch.randperm(19)
    seq_idx = torch.randint(0, 2, (2, 19))
    got = m._forward_ordered(u, perm, seq_idx, "torch")
    torch.testing.assert_close(got, m(u, scan_order=perm, seq_idx=seq_idx), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("shared", [False, True], ids=["per_direction", "shared"])
def test_stacked_directions_equal_the_loop_float64(shared):
    mixers = [make_mixer(seed=10 + k) for k in range(1 if shared else 3)]
    u = torch.randn(2, 15, 16, dtype=F64)
    orders = [None, torch.arange(14, -1, -1), torch.randperm(15)]
    seq_idx = (torch.arange(15) >= 6).long().expand(2, 15)

    def loop(u):
        return sum(mixers[0 if shared else k](u, scan_order=o, seq_idx=seq_idx) for k, o in enumerate(orders))

    _assert_same(_with_grads(lambda u: mixers_forward_stacked(mixers, u, orders, seq_idx, backend="torch"), mixers, u),
                 _with_grads(loop, mixers, u), 1e-12)


@pytest.fixture(scope="class")
def interpreted():
    with _kernel_mode(interpret=True, modules=TRITON_MODULES):
        yield


@pytest.mark.usefixtures("interpreted")
class TestTritonPath:
    def test_mixer_triton_path_equals_torch_path(self):
        ref = make_mixer(seed=7, dtype=torch.float32)
        tri = make_mixer(seed=7, dtype=torch.float32, scan_backend="triton")
        tri.load_state_dict(ref.state_dict())
        u = torch.randn(2, 21, 16)
        perm = torch.randperm(21, generator=torch.Generator().manual_seed(1))
        seq_idx = torch.tensor([[0] * 8 + [1] * 13, [0] * 21])
        assert tri.resolve_backend(u) == "triton" and ref.resolve_backend(u) == "torch"
        for order, seq in ((perm, seq_idx), (None, None), (torch.arange(20, -1, -1), None)):
            _assert_same(_with_grads(lambda u: tri(u, scan_order=order, seq_idx=seq), [tri], u),
                         _with_grads(lambda u: ref(u, scan_order=order, seq_idx=seq), [ref], u), 2e-5)

    @pytest.mark.parametrize("shared", [False, True], ids=["per_direction", "shared"])
    def test_block_stacked_directions_equal_per_direction_loop(self, shared):
        cfg = ModelConfig(d_model=16, d_state=4, headdim=8, ngroups=2, chunk_size=16, scan_backend="triton",
                          proj_bias=True, share_direction_weights=shared)
        torch.manual_seed(8)
        block = MambaBlock(cfg, ["row", "row_rev", "col"])
        L = 18
        orders = {"row": torch.arange(L), "row_rev": torch.arange(L - 1, -1, -1),
                  "col": torch.arange(L).view(3, 6).t().reshape(-1)}
        x = torch.randn(2, L, 16)
        assert block._stacked_backend(block.norm(x)) == "triton"
        stacked = _with_grads(lambda x: block(x, orders), [block], x)
        block.stack_directions = False
        _assert_same(stacked, _with_grads(lambda x: block(x, orders), [block], x), 2e-5)
