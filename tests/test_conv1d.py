"""The ordered causal depthwise conv1d (kernels/conv1d): torch and Triton paths against the loop.

The Triton kernels run in Triton's interpreter on CPU (tiny shapes: ~0.1-0.4 s a launch); the
kernel module is (re)imported in interpreter mode per test class by ``_kernel_mode`` (see
tests/test_ssd_triton.py). The ``gpu`` test repeats the comparison on CUDA at a realistic size.
"""

from __future__ import annotations

import pytest
import torch

from kernels.conv1d import causal_conv1d, causal_conv1d_multi, causal_conv1d_reference
from test_ssd_triton import _kernel_mode, rel_err

CONV_MODULES = ("kernels.conv1d.triton_conv",)


def make_inputs(batch, seqlen, channels, width, *, seed, opts=(), dtype=torch.float32, device="cpu"):
    """x (a strided slice of a wider tensor, as in the mixer), weight, and a kwargs dict."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, seqlen, channels + 7, generator=g)[..., 3:3 + channels]
    w = torch.randn(channels, width, generator=g) * 0.5
    kw = {"bias": None if "nobias" in opts else torch.randn(channels, generator=g)}
    kw["activation"] = None if "noact" in opts else "silu"
    if "order" in opts:
        kw["scan_order"] = torch.randperm(seqlen, generator=g)
    if "flip" in opts:
        kw["scan_order"] = torch.arange(seqlen - 1, -1, -1)
    if "seq" in opts:  # sorted: packed samples
        kw["seq_idx"] = torch.randint(0, 3, (batch, seqlen), generator=g).sort(dim=1).values
    if "seq_any" in opts:  # unsorted: a boundary at every change of id
        kw["seq_idx"] = torch.randint(0, 2, (batch, seqlen), generator=g)
    mv = lambda t: t if t is None or not torch.is_tensor(t) else (  # noqa: E731
        t.to(device, dtype) if t.is_floating_point() else t.to(device))
    return mv(x), mv(w), {k: mv(v) for k, v in kw.items()}


def with_grads(fn, x, w, kw, seed=1):
    """y and the gradients (x, weight, bias) of a random linear function of y."""
    leaves = {"x": x.detach().clone().requires_grad_(), "weight": w.detach().clone().requires_grad_()}
    if kw.get("bias") is not None:
        leaves["bias"] = kw["bias"].detach().clone().requires_grad_()
    y = fn(leaves["x"], leaves["weight"], **{**kw, **({"bias": leaves["bias"]} if "bias" in leaves else {})})
    wy = torch.randn(y.shape, generator=torch.Generator().manual_seed(seed)).to(y.device)
    (y.float() * wy).sum().backward()
    return y, {k: v.grad for k, v in leaves.items()}


# (batch, seqlen, channels, width, opts): odd lengths, several widths; 70 > one 64-step block
CASES = [
    (2, 23, 20, 4, ()),
    (1, 70, 70, 4, ("order", "seq")),
    (2, 19, 12, 3, ("flip", "seq_any", "nobias")),
    (1, 9, 5, 4, ("order", "noact")),
    (2, 5, 6, 1, ("order", "seq")),
    (1, 17, 8, 2, ("seq_any", "order")),
    (2, 5, 6, 1, ("order", "nobias")),  # no seq_idx: the torch path's own autograd function
    (3, 2, 7, 4, ()),  # fewer positions than taps
]


def case_id(c):
    return f"b{c[0]}-L{c[1]}-C{c[2]}-W{c[3]}-{'+'.join(c[4]) or 'plain'}"


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_torch_matches_reference_float64(case):
    b, L, C, W, opts = case
    x, w, kw = make_inputs(b, L, C, W, seed=L + C, opts=opts, dtype=torch.float64)
    y, grads = with_grads(lambda *a, **k: causal_conv1d(*a, **k, backend="torch"), x, w, kw)
    yr, ref = with_grads(causal_conv1d_reference, x, w, kw)
    assert rel_err(y, yr) < 1e-12
    for name in ref:
        assert rel_err(grads[name], ref[name]) < 1e-12, name


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_torch_low_precision_matches_reference(dtype):
    """float32 and bfloat16 inputs (the trainer's dtypes) against the float64 loop; bf16 computes in
    float32 inside and rounds once at the end."""
    x, w, kw = make_inputs(4, 33, 40, 4, seed=7, opts=("order",), dtype=torch.float64)
    yr, ref = with_grads(causal_conv1d_reference, x, w, kw)
    lo = {k: v.to(dtype) if torch.is_tensor(v) and v.is_floating_point() else v for k, v in kw.items()}
    y, grads = with_grads(lambda *a, **k: causal_conv1d(*a, **k, backend="torch"), x.to(dtype), w.to(dtype), lo)
    assert y.dtype == dtype
    tol = 1e-6 if dtype == torch.float32 else 1e-2
    assert rel_err(y.double(), yr) < tol
    for name in ref:
        assert rel_err(grads[name].double(), ref[name]) < tol, name


def test_order_equals_permute_conv_unpermute():
    x, w, kw = make_inputs(2, 21, 6, 4, seed=3, opts=("order", "seq_any"), dtype=torch.float64)
    order, seq = kw.pop("scan_order"), kw.pop("seq_idx")
    expected = causal_conv1d(x[:, order], w, **kw, seq_idx=seq[:, order], backend="reference")[:, order.argsort()]
    got = causal_conv1d(x, w, **kw, scan_order=order, seq_idx=seq, backend="reference")
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
    # a packed sample convolves as if alone: the first rows of sample 2 see none of sample 1
    seq_sorted = (torch.arange(21) >= 8).long().expand(2, 21)
    whole = causal_conv1d(x, w, **kw, seq_idx=seq_sorted, backend="reference")
    parts = torch.cat([causal_conv1d(p, w, **kw, backend="reference") for p in x.split([8, 13], dim=1)], dim=1)
    torch.testing.assert_close(whole, parts, rtol=1e-12, atol=1e-12)


def test_multi_torch_and_argument_checks():
    K, b, L, C, W = 3, 2, 13, 6, 4
    x = torch.randn(K, b, L, C, dtype=torch.float64)
    w = torch.randn(K, C, W, dtype=torch.float64)
    orders = [None, torch.arange(L - 1, -1, -1), torch.randperm(L)]
    seq = (torch.arange(L) >= 5).long().expand(b, L)
    y = causal_conv1d_multi(x, w, None, orders, seq, backend="torch")
    for k in range(K):
        torch.testing.assert_close(y[k], causal_conv1d_reference(x[k], w[k], None, orders[k], seq, "silu"))
    with pytest.raises(ValueError, match="weight must have a leading K = 3"):
        causal_conv1d_multi(x, w[:2], backend="torch")
    with pytest.raises(ValueError, match="scan_order must be a permutation"):
        causal_conv1d_multi(x, w, scan_order=[None, None, torch.zeros(L, dtype=torch.long)], backend="torch")
    with pytest.raises(ValueError, match="weight must have shape"):
        causal_conv1d(x[0], w[0].T)
    with pytest.raises(ValueError, match="unknown backend"):
        causal_conv1d(x[0], w[0], backend="cuda")
    with pytest.raises(ValueError, match="unknown activation"):
        causal_conv1d(x[0], w[0], activation="gelu")
    assert causal_conv1d(x[0, :, :0], w[0]).shape == (b, 0, C)


@pytest.fixture(scope="class")
def interpreted():
    with _kernel_mode(interpret=True, modules=CONV_MODULES):
        yield


@pytest.mark.usefixtures("interpreted")
class TestInterpreter:
    @pytest.mark.parametrize("case", CASES, ids=case_id)
    def test_forward_and_gradients_match_reference(self, case):
        b, L, C, W, opts = case
        x, w, kw = make_inputs(b, L, C, W, seed=2 * L + C, opts=opts)
        y, grads = with_grads(lambda *a, **k: causal_conv1d(*a, **k, backend="triton"), x, w, kw)
        yr, ref = with_grads(causal_conv1d_reference, x, w, kw)
        assert y.dtype == torch.float32 and rel_err(y, yr) < 1e-6
        assert set(grads) == set(ref)
        for name in ref:
            assert rel_err(grads[name], ref[name]) < 1e-5, name

    @pytest.mark.parametrize("shared", [False, True], ids=["per_direction", "shared"])
    def test_multi_direction_one_launch(self, shared):
        K, b, L, C, W = 3, 2, 21, 10, 4
        g = torch.Generator().manual_seed(7)
        base = torch.randn(b, L, K, C + 3, generator=g)  # K views into one projection, as in the block
        x = base[..., :C].permute(2, 0, 1, 3)
        w = torch.randn(C, W, generator=g) if shared else torch.randn(K, C, W, generator=g)
        bias = torch.randn(C, generator=g) if shared else torch.randn(K, C, generator=g)
        orders = [torch.arange(L - 1, -1, -1), None, torch.randperm(L, generator=g)]
        seq = (torch.arange(L) >= 8).long().expand(b, L)
        res = {}
        for backend in ("triton", "reference"):
            leaves = [t.clone().requires_grad_() for t in (x, w, bias)]
            y = causal_conv1d_multi(*leaves, scan_order=orders, seq_idx=seq, backend=backend)
            (y * torch.linspace(-1, 1, y.numel()).view(y.shape)).sum().backward()
            res[backend] = (y, [t.grad for t in leaves])
        assert rel_err(res["triton"][0], res["reference"][0]) < 1e-6
        for name, a, r in zip(("x", "weight", "bias"), res["triton"][1], res["reference"][1]):
            assert rel_err(a, r) < 1e-5, name

    def test_float16(self):
        x, w, kw = make_inputs(1, 20, 8, 4, seed=4, opts=("order", "seq"))
        y = causal_conv1d(x.half(), w.half(), **{**kw, "bias": kw["bias"].half()}, backend="triton")
        assert y.dtype == torch.float16
        assert rel_err(y, causal_conv1d_reference(x, w, **kw)) < 3e-3

    def test_dispatch(self):
        x, w, kw = make_inputs(1, 7, 4, 4, seed=5)
        # auto picks torch for CPU tensors even when the interpreter could run Triton
        torch.testing.assert_close(causal_conv1d(x, w, **kw), causal_conv1d(x, w, **kw, backend="torch"))
        with pytest.raises(NotImplementedError, match="float64"):
            causal_conv1d(x.double(), w.double(), backend="triton")


def test_compiled_kernels_refuse_cpu_tensors():
    with _kernel_mode(interpret=False, modules=CONV_MODULES):
        x, w, kw = make_inputs(1, 5, 4, 4, seed=0)
        with pytest.raises(NotImplementedError, match="CUDA tensors.*backend='torch'"):
            causal_conv1d(x, w, **kw, backend="triton")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_bf16_multi_matches_torch():
    with _kernel_mode(interpret=False, modules=CONV_MODULES):
        K, b, L, C, W = 4, 2, 4099, 384, 4
        x = torch.randn(K, b, L, C, device="cuda")
        w, bias = torch.randn(K, C, W, device="cuda") * 0.5, torch.randn(K, C, device="cuda")
        orders = [None, torch.arange(L - 1, -1, -1, device="cuda"), torch.randperm(L, device="cuda"),
                  torch.randperm(L, device="cuda")]
        seq = (torch.arange(L, device="cuda") >= 1000).long().expand(b, L)
        res = {}
        for backend, dtype in (("triton", torch.bfloat16), ("torch", torch.float32)):
            leaves = [t.to(dtype).requires_grad_() for t in (x, w, bias)]
            y = causal_conv1d_multi(*leaves, scan_order=orders, seq_idx=seq, backend=backend)
            (y.float() * torch.linspace(-1, 1, y.numel(), device="cuda").view(y.shape)).sum().backward()
            res[backend] = (y, [t.grad for t in leaves])
        assert rel_err(res["triton"][0], res["torch"][0]) < 2e-2
        for name, a, r in zip(("x", "weight", "bias"), res["triton"][1], res["torch"][1]):
            assert rel_err(a, r) < 3e-2, name
