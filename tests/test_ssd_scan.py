"""kernels.ssd.ssd_scan: the chunked torch backend against the sequential reference, by hand,
against mamba-ssm's own reference functions, and its argument checks."""

from __future__ import annotations

import math
import sys

import pytest
import torch

from kernels.ssd import ssd_scan, ssd_scan_chunked, ssd_scan_reference

F64 = torch.float64


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def make_inputs(batch, seqlen, nheads, headdim, ngroups, dstate, *, seed, dtype=F64, opts=()):
    """Random scan inputs; ``opts`` picks optional arguments (see CASES)."""
    g = torch.Generator().manual_seed(seed)

    def rn(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g, dtype=F64) * scale).to(dtype)

    x = rn(batch, seqlen, nheads, headdim)
    if "softplus" in opts:
        dt = rn(batch, seqlen, nheads) - 1.0
    else:
        dt = (torch.rand(batch, seqlen, nheads, generator=g, dtype=F64) * 0.5).to(dtype)
    A = -(torch.rand(nheads, generator=g, dtype=F64) * 4 + 0.2).to(dtype)
    B = rn(batch, seqlen, ngroups, dstate, scale=0.7)
    C = rn(batch, seqlen, ngroups, dstate, scale=0.7)
    kw = {}
    if "D1" in opts:
        kw["D"] = rn(nheads)
    if "D2" in opts:
        kw["D"] = rn(nheads, headdim)
    if "z" in opts:
        kw["z"] = rn(batch, seqlen, nheads, headdim)
    if "bias" in opts:
        kw["dt_bias"] = rn(nheads, scale=0.3)
    if "softplus" in opts:
        kw["dt_softplus"] = True
    if "init" in opts:
        kw["initial_states"] = rn(batch, nheads, headdim, dstate)
    if "final" in opts:
        kw["return_final_states"] = True
    if "seq" in opts:  # sorted ids: packed sequences
        kw["seq_idx"] = torch.randint(0, 3, (batch, seqlen), generator=g).sort(dim=1).values
    if "seq_any" in opts:  # unsorted ids: a reset at every change
        kw["seq_idx"] = torch.randint(0, 2, (batch, seqlen), generator=g)
    if "order" in opts:
        kw["scan_order"] = torch.randperm(seqlen, generator=g)
    return (x, dt, A, B, C), kw


def as_tuple(out):
    return out if isinstance(out, tuple) else (out,)


# (seqlen, chunk_size, nheads, headdim, ngroups, dstate, opts)
CASES = [
    (1, 16, 2, 4, 1, 3, ()),
    (1, 16, 2, 2, 2, 3, ("D1", "z", "init", "final")),
    (37, 16, 4, 8, 2, 5, ("z", "D1", "bias")),
    (33, 32, 8, 4, 1, 16, ("D1", "z", "bias", "softplus", "final", "order")),  # the tiny model's 33 tokens: 2 chunks of 17
    (37, 32, 6, 3, 2, 4, ("z", "D2", "bias", "softplus", "init", "final", "seq", "order")),
    (100, 32, 4, 4, 1, 16, ("D2", "init", "final", "seq", "order")),
    (100, 16, 2, 8, 2, 8, ("z", "bias", "softplus", "seq_any", "final")),
    (64, 16, 4, 4, 4, 2, ("D1", "softplus", "bias", "init", "final", "order")),
    (33, 64, 8, 4, 1, 16, ("D1", "z", "bias", "softplus", "seq", "order")),  # one chunk: no state kept
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"L{c[0]}-Q{c[1]}-h{c[2]}-g{c[4]}-{'+'.join(c[6]) or 'plain'}")
def test_torch_matches_reference_float64(case):
    seqlen, chunk, nheads, headdim, ngroups, dstate, opts = case
    args, kw = make_inputs(2, seqlen, nheads, headdim, ngroups, dstate, seed=seqlen + nheads, opts=opts)
    got = as_tuple(ssd_scan(*args, **kw, chunk_size=chunk, backend="torch"))
    ref = as_tuple(ssd_scan(*args, **kw, backend="reference"))
    assert len(got) == len(ref)
    for a, b in zip(got, ref):
        assert a.dtype == b.dtype == F64
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"L{c[0]}-Q{c[1]}-h{c[2]}-g{c[4]}-{'+'.join(c[6]) or 'plain'}")
def test_torch_float32_close_to_float64_reference(case):
    seqlen, chunk, nheads, headdim, ngroups, dstate, opts = case
    args, kw = make_inputs(2, seqlen, nheads, headdim, ngroups, dstate, seed=7 * seqlen, opts=opts)
    args32 = tuple(t.float() for t in args)
    kw32 = {k: (v.float() if torch.is_tensor(v) and v.is_floating_point() else v) for k, v in kw.items()}
    got = as_tuple(ssd_scan(*args32, **kw32, chunk_size=chunk))
    ref = as_tuple(ssd_scan_reference(*args, **kw))
    for a, b in zip(got, ref):
        assert a.dtype == torch.float32
        assert rel_err(a, b) < 1e-4


def test_gradients_match_reference_float64():
    opts = ("z", "D2", "bias", "softplus", "init", "final", "seq", "order")
    (x, dt, A, B, C), kw = make_inputs(2, 37, 4, 3, 2, 4, seed=11, opts=opts)
    leaves = {"x": x, "dt": dt, "A": A, "B": B, "C": C, "D": kw["D"], "z": kw["z"],
              "dt_bias": kw["dt_bias"], "initial_states": kw["initial_states"]}
    g = torch.Generator().manual_seed(12)
    w_y = torch.randn(x.shape, generator=g, dtype=F64)
    w_s = torch.randn(kw["initial_states"].shape, generator=g, dtype=F64)

    def grads(fn, **extra):
        ls = {k: v.detach().clone().requires_grad_() for k, v in leaves.items()}
        rest = {k: v for k, v in kw.items() if k not in ls}
        y, s = fn(ls["x"], ls["dt"], ls["A"], ls["B"], ls["C"], D=ls["D"], z=ls["z"], dt_bias=ls["dt_bias"],
                  initial_states=ls["initial_states"], **rest, **extra)
        ((y * w_y).sum() + (s * w_s).sum()).backward()
        return {k: v.grad for k, v in ls.items()}

    got = grads(ssd_scan_chunked, chunk_size=16)
    ref = grads(ssd_scan_reference)
    for name in leaves:
        assert got[name] is not None, name
        torch.testing.assert_close(got[name], ref[name], rtol=1e-9, atol=1e-10, msg=name)


def test_one_chunk_gradients_match_reference_float64():
    """A sequence within one chunk, no initial or final state: the chunked path skips the chunk
    states and their recurrence; the gradients must still be the loop's."""
    (x, dt, A, B, C), kw = make_inputs(2, 33, 4, 3, 2, 4, seed=13, opts=("z", "D2", "bias", "softplus", "seq", "order"))
    leaves = {"x": x, "dt": dt, "A": A, "B": B, "C": C,
              "D": kw.pop("D"), "z": kw.pop("z"), "dt_bias": kw.pop("dt_bias")}
    w_y = torch.randn(x.shape, generator=torch.Generator().manual_seed(14), dtype=F64)

    def grads(fn, **extra):
        ls = {k: v.detach().clone().requires_grad_() for k, v in leaves.items()}
        y = fn(ls["x"], ls["dt"], ls["A"], ls["B"], ls["C"], D=ls["D"], z=ls["z"], dt_bias=ls["dt_bias"], **kw, **extra)
        (y * w_y).sum().backward()
        return {k: v.grad for k, v in ls.items()}

    got, ref = grads(ssd_scan_chunked, chunk_size=64), grads(ssd_scan_reference)
    for name in leaves:
        torch.testing.assert_close(got[name], ref[name], rtol=1e-9, atol=1e-10, msg=name)


@pytest.mark.parametrize("backend,chunk", [("torch", 1), ("torch", 16), ("reference", 64)])
def test_hand_computed_tiny_case(backend, chunk):
    # batch 1, seqlen 2, 1 head, headdim 1, dstate 1
    x = torch.tensor([1.0, 2.0], dtype=F64).view(1, 2, 1, 1)
    dt = torch.tensor([0.5, 0.25], dtype=F64).view(1, 2, 1)
    A = torch.tensor([-2.0], dtype=F64)
    B = torch.tensor([3.0, -1.0], dtype=F64).view(1, 2, 1, 1)
    C = torch.tensor([2.0, 4.0], dtype=F64).view(1, 2, 1, 1)
    D = torch.tensor([0.5], dtype=F64)
    # h0 = e^{-1}*0 + 0.5*1*3 = 1.5;  y0 = 1.5*2 + 0.5*1 = 3.5
    # h1 = e^{-0.5}*1.5 + 0.25*2*(-1) = 1.5 e^{-0.5} - 0.5;  y1 = 4 h1 + 0.5*2
    h1 = 1.5 * math.exp(-0.5) - 0.5
    y, s = ssd_scan(x, dt, A, B, C, D=D, return_final_states=True, chunk_size=chunk, backend=backend)
    torch.testing.assert_close(y.flatten(), torch.tensor([3.5, 4 * h1 + 1.0], dtype=F64), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(s.flatten(), torch.tensor([h1], dtype=F64), rtol=1e-12, atol=1e-12)

    # With initial state 2 and gate z = [0, 1]: h0 = 2e^{-1} + 1.5, y0 = 0 (silu(0) = 0),
    # h1 = e^{-0.5} h0 - 0.5, y1 = (4 h1 + 1) * silu(1), silu(1) = 1 / (1 + e^{-1}).
    z = torch.tensor([0.0, 1.0], dtype=F64).view(1, 2, 1, 1)
    init = torch.full((1, 1, 1, 1), 2.0, dtype=F64)
    h0 = 2 * math.exp(-1.0) + 1.5
    h1 = math.exp(-0.5) * h0 - 0.5
    y, s = ssd_scan(x, dt, A, B, C, D=D, z=z, initial_states=init, return_final_states=True,
                    chunk_size=chunk, backend=backend)
    expected = torch.tensor([0.0, (4 * h1 + 1.0) / (1 + math.exp(-1.0))], dtype=F64)
    torch.testing.assert_close(y.flatten(), expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(s.flatten(), torch.tensor([h1], dtype=F64), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("backend", ["torch", "reference"])
def test_scan_order_equals_permute_then_unpermute(backend):
    opts = ("z", "D1", "bias", "softplus", "init", "final", "seq")
    (x, dt, A, B, C), kw = make_inputs(2, 45, 4, 4, 2, 6, seed=3, opts=opts)
    perm = torch.randperm(45, generator=torch.Generator().manual_seed(4))
    inverse = perm.argsort()
    y, s = ssd_scan(x, dt, A, B, C, **kw, scan_order=perm, chunk_size=16, backend=backend)
    pkw = dict(kw, z=kw["z"][:, perm], seq_idx=kw["seq_idx"][:, perm])
    yp, sp = ssd_scan(x[:, perm], dt[:, perm], A, B[:, perm], C[:, perm], **pkw, chunk_size=16, backend=backend)
    torch.testing.assert_close(y, yp[:, inverse], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(s, sp, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("backend", ["torch", "reference"])
def test_seq_idx_equals_separate_segments(backend):
    lens = [13, 1, 20, 7]  # segments of one packed row, cut across chunk boundaries
    L = sum(lens)
    (x, dt, A, B, C), kw = make_inputs(1, L, 4, 3, 2, 5, seed=5, opts=("z", "D1", "bias", "softplus", "init"))
    seq_idx = torch.repeat_interleave(torch.arange(len(lens)), torch.tensor(lens))[None]
    y, s = ssd_scan(x, dt, A, B, C, **kw, seq_idx=seq_idx, return_final_states=True, chunk_size=8, backend=backend)
    start, init = 0, kw["initial_states"]
    for i, n in enumerate(lens):
        sl = slice(start, start + n)
        ys, ss = ssd_scan(x[:, sl], dt[:, sl], A, B[:, sl], C[:, sl], D=kw["D"], z=kw["z"][:, sl],
                          dt_bias=kw["dt_bias"], dt_softplus=True, initial_states=init if i == 0 else None,
                          return_final_states=True, chunk_size=8, backend=backend)
        torch.testing.assert_close(y[:, sl], ys, rtol=1e-12, atol=1e-12)
        start += n
    torch.testing.assert_close(s, ss, rtol=1e-12, atol=1e-12)  # final state = last segment's


def test_bfloat16_inputs_with_float32_parameters():
    (x, dt, A, B, C), kw = make_inputs(2, 50, 4, 8, 1, 8, seed=9, opts=("D1", "bias", "softplus", "z"))
    ref = ssd_scan_reference(x, dt, A, B, C, **kw)
    bf = lambda t: t.to(torch.bfloat16)  # noqa: E731
    y = ssd_scan(bf(x), bf(dt), A.float(), bf(B), bf(C), D=kw["D"].float(), z=bf(kw["z"]),
                 dt_bias=kw["dt_bias"].float(), dt_softplus=True, chunk_size=16)
    assert y.dtype == torch.bfloat16
    assert rel_err(y, ref) < 3e-2


# ----- against mamba-ssm's own reference functions (imported through the CPU shim) -----------


@pytest.fixture(scope="module")
def mamba_ssm():
    from kernels.mamba_ssm_compat import import_mamba_ssm

    return import_mamba_ssm()


def test_matches_mamba_ssm_ssd_minimal_discrete(mamba_ssm):
    from mamba_ssm.modules.ssd_minimal import ssd_minimal_discrete

    (x, dt, A, B, C), kw = make_inputs(2, 64, 4, 4, 2, 6, seed=21, opts=("init",))
    heads = torch.arange(4) // 2
    Y, final = ssd_minimal_discrete(x * dt[..., None], A * dt, B[:, :, heads], C[:, :, heads], 16,
                                    initial_states=kw["initial_states"][:, None])
    y, s = ssd_scan(x, dt, A, B, C, **kw, return_final_states=True, chunk_size=32)
    torch.testing.assert_close(y, Y, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(s, final, rtol=1e-10, atol=1e-10)


def test_matches_mamba_ssm_chunk_scan_combined_ref(mamba_ssm):
    from mamba_ssm.ops.triton.ssd_combined import ssd_chunk_scan_combined_ref

    (x, dt, A, B, C), kw = make_inputs(2, 64, 4, 8, 2, 8, seed=22, dtype=torch.float32,
                                       opts=("D2", "z", "bias", "softplus"))
    Y = ssd_chunk_scan_combined_ref(x, dt, A, B, C, 16, **kw)
    y = ssd_scan(x, dt, A, B, C, **kw, chunk_size=32)
    assert rel_err(y, Y) < 1e-5


def test_matches_mamba_ssm_selective_scan_ref(mamba_ssm):
    from mamba_ssm.ops.selective_scan_interface import selective_scan_ref

    b, L, h, p, g, n = 2, 40, 4, 3, 2, 5
    (x, dt, A, B, C), kw = make_inputs(b, L, h, p, g, n, seed=23, dtype=torch.float32,
                                       opts=("D1", "z", "bias", "softplus"))
    hp = lambda t: t.repeat_interleave(p)  # noqa: E731  per-head -> per-channel
    out = selective_scan_ref(
        x.flatten(2).transpose(1, 2), dt.repeat_interleave(p, dim=2).transpose(1, 2),
        hp(A)[:, None].expand(h * p, n), B.permute(0, 2, 3, 1), C.permute(0, 2, 3, 1),
        D=hp(kw["D"]), z=kw["z"].flatten(2).transpose(1, 2), delta_bias=hp(kw["dt_bias"]), delta_softplus=True,
    )
    y = ssd_scan(x, dt, A, B, C, **kw, chunk_size=16)
    assert rel_err(y, out.transpose(1, 2).unflatten(2, (h, p))) < 1e-5


def test_compat_stubs_only_missing_extensions(monkeypatch):
    from kernels import mamba_ssm_compat as compat

    missing = "mdm_test_no_such_cuda_ext"
    monkeypatch.setattr(compat, "CUDA_EXTENSIONS", ("math", missing))
    monkeypatch.delitem(sys.modules, missing, raising=False)
    real_math = sys.modules["math"]
    try:
        assert compat.install_cuda_extension_stubs() == [missing]
        assert sys.modules["math"] is real_math and not compat.is_stub(real_math)
        stub = sys.modules[missing]
        assert compat.is_stub(stub)
        with pytest.raises(RuntimeError, match=f"{missing}.fwd.*not available"):
            stub.fwd(1, 2)
    finally:
        sys.modules.pop(missing, None)


# ----- argument checks -------------------------------------------------------------------------


def test_backend_choices():
    args, _ = make_inputs(1, 5, 2, 2, 1, 2, seed=0)
    with pytest.raises(ValueError, match="auto, torch, reference, triton"):
        ssd_scan(*args, backend="cuda")
    with pytest.raises(NotImplementedError, match="backend='torch'"):
        ssd_scan(*args, backend="triton")
    torch.testing.assert_close(ssd_scan(*args, backend="auto"), ssd_scan(*args, backend="torch"))


@pytest.mark.parametrize(
    "change,match",
    [
        (lambda a, k: a.update(dt=a["dt"][..., :1]), r"dt must have shape"),
        (lambda a, k: a.update(A=a["A"][None]), r"A must have shape"),
        (lambda a, k: a.update(C=a["C"][..., :1]), r"C must have shape"),
        (lambda a, k: a.update(B=a["B"].expand(1, 5, 3, 2)), r"multiple of ngroups"),
        (lambda a, k: k.update(D=torch.ones(3, dtype=F64)), r"D must have shape"),
        (lambda a, k: k.update(z=torch.ones(1, 5, 2, 3, dtype=F64)), r"z must have shape"),
        (lambda a, k: k.update(initial_states=torch.ones(1, 2, 2, 3, dtype=F64)), r"initial_states must"),
        (lambda a, k: k.update(seq_idx=torch.zeros(1, 4, dtype=torch.long)), r"seq_idx must have shape"),
        (lambda a, k: k.update(seq_idx=torch.zeros(1, 5)), r"seq_idx must be an integer"),
        (lambda a, k: k.update(scan_order=torch.tensor([0, 1, 1, 3, 4])), r"permutation"),
        (lambda a, k: k.update(chunk_size=0), r"chunk_size"),
    ],
)
def test_shape_errors_name_the_argument(change, match):
    (x, dt, A, B, C), _ = make_inputs(1, 5, 2, 2, 1, 2, seed=0)
    a, k = dict(x=x, dt=dt, A=A, B=B, C=C), {}
    change(a, k)
    with pytest.raises(ValueError, match=match):
        ssd_scan(a["x"], a["dt"], a["A"], a["B"], a["C"], **k)


def test_empty_sequence_passes_state_through():
    (x, dt, A, B, C), kw = make_inputs(2, 0, 2, 3, 1, 4, seed=0, opts=("init",))
    y, s = ssd_scan(x, dt, A, B, C, **kw, return_final_states=True)
    assert y.shape == x.shape
    torch.testing.assert_close(s, kw["initial_states"])
