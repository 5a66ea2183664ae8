"""The Triton SSD scan (kernels/ssd/triton_*.py) against the sequential reference.

On CPU the kernels run in Triton's interpreter. Triton reads ``TRITON_INTERPRET`` when a kernel
is *decorated*, i.e. when ``kernels.ssd.triton_fwd`` / ``triton_bwd`` are imported, and another
test may already have imported them in compiled mode (or may need them compiled later). So each
test class (re)imports the kernel modules in the mode it needs (``_kernel_mode``) and restores
the previous state when it ends; nothing depends on the order pytest runs modules in.

The interpreter is slow (~0.2 s per forward launch on 2 cores): shapes here are tiny. The tests
marked ``gpu`` repeat the comparison on CUDA at realistic sizes (run by benchmarks/gpu_check.sh).
"""

from __future__ import annotations

import contextlib
import importlib
import os
import sys

import pytest
import torch

from kernels.ssd import ssd_scan, ssd_scan_multi, ssd_scan_reference

KERNEL_MODULES = ("kernels.ssd.triton_fwd", "kernels.ssd.triton_bwd", "kernels.ssd.triton_scan",
                  "kernels.ssd.triton_par")
GRAD_NAMES = ("x", "dt", "A", "B", "C", "D", "z", "dt_bias", "initial_states")


@contextlib.contextmanager
def _kernel_mode(interpret: bool, modules: tuple[str, ...] = KERNEL_MODULES):
    """Import the Triton kernel modules fresh, interpreted or compiled; undo on exit.

    ``modules`` are dotted names (the kernels of another op, e.g. ``kernels.conv1d.triton_conv``,
    work the same way); each is also dropped from, and restored to, its parent package.
    """
    saved_env = os.environ.get("TRITON_INTERPRET")
    saved_mods = {name: sys.modules.get(name) for name in modules}

    def parent_and_leaf(name):
        pkg_name, leaf = name.rsplit(".", 1)
        return importlib.import_module(pkg_name), leaf

    def drop():
        for name in modules:
            sys.modules.pop(name, None)
            pkg, leaf = parent_and_leaf(name)
            if hasattr(pkg, leaf):
                delattr(pkg, leaf)

    drop()
    os.environ["TRITON_INTERPRET"] = "1" if interpret else "0"
    restore_lang = _language_mode(interpret)
    try:
        for name in modules:
            importlib.import_module(name)
        yield
    finally:
        restore_lang()
        drop()
        if saved_env is None:
            os.environ.pop("TRITON_INTERPRET", None)
        else:
            os.environ["TRITON_INTERPRET"] = saved_env
        for name, mod in saved_mods.items():
            if mod is not None:
                sys.modules[name] = mod
                pkg, leaf = parent_and_leaf(name)
                setattr(pkg, leaf, mod)


def _language_mode(interpret: bool):
    """Make triton.language's own jit'd helpers (``tl.zeros``, ``tl.sigmoid``, ``tl.max``, ...) match
    the mode; returns the function that undoes it.

    They are decorated once, when ``triton.language`` is first imported, in the mode of that moment;
    torch itself may import it early (building a module on the meta device does), and an
    interpreted kernel calling a compiled helper fails ("Cannot call @triton.jit'd outside of the
    scope of a kernel"), as does the reverse.
    """
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction

    wrong, make = (JITFunction, InterpretedFunction) if interpret else (InterpretedFunction, JITFunction)
    swapped, replacement = [], {}
    for name, mod in list(sys.modules.items()):
        if mod is None or not (name == "triton.language" or name.startswith("triton.language.")):
            continue
        for attr, obj in list(vars(mod).items()):
            if type(obj) is wrong:
                if id(obj) not in replacement:  # one replacement per helper, shared by re-exports
                    replacement[id(obj)] = make(obj.fn)
                swapped.append((mod, attr, obj))
                setattr(mod, attr, replacement[id(obj)])

    def restore():
        for mod, attr, obj in swapped:
            setattr(mod, attr, obj)

    return restore


def rel_err(a, b) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def make_inputs(batch, seqlen, nheads, headdim, ngroups, dstate, *, seed, opts=(), device="cpu",
                dtype=torch.float32):
    """Random inputs: (x, dt, A, B, C) and a kwargs dict picked by ``opts``."""
    g = torch.Generator().manual_seed(seed)
    rn = lambda *s, scale=1.0: torch.randn(*s, generator=g) * scale  # noqa: E731
    x = rn(batch, seqlen, nheads, headdim)
    dt = rn(batch, seqlen, nheads) - 1.0 if "softplus" in opts else torch.rand(batch, seqlen, nheads, generator=g) * 0.5
    A = -(torch.rand(nheads, generator=g) * 4 + 0.2)
    B, C = rn(batch, seqlen, ngroups, dstate, scale=0.7), rn(batch, seqlen, ngroups, dstate, scale=0.7)
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
    if "seq" in opts:  # sorted: packed sequences
        kw["seq_idx"] = torch.randint(0, 3, (batch, seqlen), generator=g).sort(dim=1).values
    if "seq_any" in opts:  # unsorted: a reset at every change of id
        kw["seq_idx"] = torch.randint(0, 2, (batch, seqlen), generator=g)
    if "order" in opts:
        kw["scan_order"] = torch.randperm(seqlen, generator=g)
    if "flip" in opts:
        kw["scan_order"] = torch.arange(seqlen - 1, -1, -1)
    mv = lambda t: t.to(device) if not t.is_floating_point() else t.to(device, dtype)  # noqa: E731
    return tuple(mv(t) for t in (x, dt, A, B, C)), {k: mv(v) if torch.is_tensor(v) else v for k, v in kw.items()}


def run_with_grads(fn, args, kw, seed=1, **extra):
    """y, final states and the gradients of a random linear function of both."""
    names = ("x", "dt", "A", "B", "C")
    leaves = {n: t.detach().clone().requires_grad_() for n, t in zip(names, args)}
    leaves.update({k: v.detach().clone().requires_grad_() for k, v in kw.items()
                   if k in GRAD_NAMES and torch.is_tensor(v)})
    rest = {k: v for k, v in kw.items() if k not in leaves}
    y, s = fn(*(leaves[n] for n in names), **{k: v for k, v in leaves.items() if k not in names}, **rest,
              return_final_states=True, **extra)
    g = torch.Generator().manual_seed(seed)
    wy = torch.randn(y.shape, generator=g).to(y.device)  # float32 whatever the dtype of y
    ws = torch.randn(s.shape, generator=g).to(s.device)
    ((y.float() * wy).sum() + (s.float() * ws).sum()).backward()
    return y, s, {k: v.grad for k, v in leaves.items()}


# (batch, seqlen, chunk, nheads, headdim, ngroups, dstate, opts): odd lengths, several group sizes
FWD_CASES = [
    (2, 37, 16, 4, 8, 2, 5, ()),
    (1, 50, 16, 2, 4, 1, 16, ("D1", "z", "bias", "init")),
    (2, 41, 16, 4, 3, 2, 4, ("z", "D2", "bias", "softplus", "init", "seq", "order")),
    (1, 33, 32, 2, 5, 2, 3, ("D1", "softplus", "seq_any", "flip")),
    (2, 20, 8, 3, 4, 3, 2, ("z", "init", "order")),
    (1, 100, 16, 4, 16, 1, 16, ("D2", "z", "bias", "softplus", "init", "seq", "order")),
]
GRAD_CASES = [
    (2, 37, 16, 4, 8, 2, 5, ("z", "D2", "bias", "softplus", "init", "seq_any", "order")),
    (1, 29, 16, 2, 4, 1, 3, ("D1", "init", "seq", "flip")),
    (1, 18, 16, 4, 2, 2, 4, ("z", "D1", "bias")),
    (1, 70, 16, 4, 16, 1, 16, ("D1", "softplus", "bias", "init", "seq", "order")),
]


def case_id(c):
    return f"b{c[0]}-L{c[1]}-Q{c[2]}-h{c[3]}-p{c[4]}-g{c[5]}-n{c[6]}-{'+'.join(c[7]) or 'plain'}"


@pytest.fixture(scope="class")
def interpreted():
    with _kernel_mode(interpret=True):
        yield


ALGOS = {"sequential": "", "parallel": "parallel=1", "parallel-nblock16": "parallel=1,bwd_nblock=16"}


@pytest.fixture(params=list(ALGOS))
def algo(request, monkeypatch):
    """The kernels' two algorithms (triton_fwd/bwd: chunks in sequence; triton_par: in parallel),
    the latter also with its backward's gradient pass in blocks of 16 dstate columns."""
    monkeypatch.setenv("MDM_SSD_TUNE", ALGOS[request.param])
    return request.param


@pytest.mark.usefixtures("interpreted")
class TestInterpreter:
    @pytest.mark.parametrize("case", FWD_CASES, ids=case_id)
    def test_forward_matches_reference(self, case, algo):
        b, L, Q, h, p, g, n, opts = case
        args, kw = make_inputs(b, L, h, p, g, n, seed=L + h, opts=opts)
        y, s = ssd_scan(*args, **kw, return_final_states=True, chunk_size=Q, backend="triton")
        yr, sr = ssd_scan_reference(*args, **kw, return_final_states=True)
        assert y.dtype == torch.float32 and s.dtype == torch.float32
        assert rel_err(y, yr) < 1e-5 and rel_err(s, sr) < 1e-5

    @pytest.mark.parametrize("deterministic", [False, True], ids=["atomic", "deterministic"])
    @pytest.mark.parametrize("case", GRAD_CASES, ids=case_id)
    def test_gradients_match_reference(self, case, deterministic, algo):
        b, L, Q, h, p, g, n, opts = case
        args, kw = make_inputs(b, L, h, p, g, n, seed=3 * L, opts=opts)
        from kernels.ssd.triton_scan import ssd_scan_triton

        y, s, got = run_with_grads(ssd_scan_triton, args, kw, chunk_size=Q, deterministic=deterministic)
        yr, sr, ref = run_with_grads(ssd_scan_reference, args, kw)
        assert rel_err(y, yr) < 1e-5 and rel_err(s, sr) < 1e-5
        assert set(got) == set(ref)
        for name in ref:
            assert got[name] is not None, name
            assert rel_err(got[name], ref[name]) < 1e-5, name

    @pytest.mark.parametrize("deterministic", [False, True], ids=["atomic", "deterministic"])
    def test_headdim_blocks_match_reference(self, monkeypatch, deterministic, algo):
        # headdim 40 in blocks of 16 (the last one partial), 2 heads per group: dB, dC, ddt, dA,
        # ddt_bias are partial sums over the blocks; every option on; 2 chunks, the last partial
        monkeypatch.setenv("MDM_SSD_HEADDIM_BLOCK", "16")
        from kernels.ssd.triton_fwd import headdim_block

        assert headdim_block(40, 8, torch.device("cpu")) == 16
        args, kw = make_inputs(1, 21, 4, 40, 2, 5, seed=77,
                               opts=("z", "D2", "bias", "softplus", "init", "seq_any", "order"))
        from kernels.ssd.triton_scan import ssd_scan_triton

        y, s, got = run_with_grads(ssd_scan_triton, args, kw, chunk_size=16, deterministic=deterministic)
        yr, sr, ref = run_with_grads(ssd_scan_reference, args, kw)
        assert rel_err(y, yr) < 1e-5 and rel_err(s, sr) < 1e-5
        for name in ref:
            assert rel_err(got[name], ref[name]) < 1e-5, name

    @pytest.mark.parametrize("deterministic", [False, True], ids=["atomic", "deterministic"])
    def test_dstate_blocks_match_reference(self, monkeypatch, deterministic):
        # the chunk-parallel backward's gradient pass with dstate 40 in blocks of 16 (three, the last
        # partial), 2 heads per group; every option on; against the sequential float64-exact path
        from kernels.ssd.triton_scan import ssd_scan_triton

        args, kw = make_inputs(1, 45, 4, 8, 2, 40, seed=58,
                               opts=("z", "D2", "bias", "softplus", "init", "seq_any", "order"))
        yr, sr, ref = run_with_grads(ssd_scan_reference, args, kw)
        for tune in ("parallel=1,bwd_nblock=16", "bwd_parallel=1,bwd_nblock=32,bwd_chunk=32"):
            monkeypatch.setenv("MDM_SSD_TUNE", tune)
            y, s, got = run_with_grads(ssd_scan_triton, args, kw, chunk_size=16, deterministic=deterministic)
            assert rel_err(y, yr) < 1e-5 and rel_err(s, sr) < 1e-5
            for name in ref:
                assert rel_err(got[name], ref[name]) < 1e-5, (tune, name)

    def test_chunk_blocks_and_tuning(self, monkeypatch):
        # chunk_size 128 runs in chunks of 64 (shared memory); a backward with its own chunk length
        # (16) and warps; the results are the same function, forward and every gradient
        from kernels.ssd.triton_fwd import chunk_block, tuning
        from kernels.ssd.triton_scan import ssd_scan_triton

        assert chunk_block(256) == 64 and chunk_block(20) == 32 and chunk_block(8) == 16
        args, kw = make_inputs(1, 150, 2, 16, 1, 16, seed=91, opts=("z", "D1", "bias", "softplus", "init", "order"))
        yr, sr, ref = run_with_grads(ssd_scan_reference, args, kw)
        for tune in ("", "fwd_chunk=32,bwd_chunk=16,bwd_warps=2", "parallel=1,fwd_chunk=32,bwd_chunk=16",
                     "bwd_parallel=1,fwd_chunk=32,fwd_warps=4", "fwd_parallel=1,bwd_chunk=32",
                     "bwd_parallel=1,bwd_nblock=128", "bwd_parallel=1,bwd_nblock=16,bwd_chunk=32"):
            monkeypatch.setenv("MDM_SSD_TUNE", tune)
            y, s, got = run_with_grads(ssd_scan_triton, args, kw, chunk_size=128)
            assert rel_err(y, yr) < 1e-5 and rel_err(s, sr) < 1e-5, tune
            for name in ref:
                assert rel_err(got[name], ref[name]) < 1e-5, (tune, name)
        for bad, msg in (("bwd_chunk=128", "out of range"), ("fwd_warps=3", "out of range"),
                         ("parallel=2", "out of range"), ("bwd_parallel=3", "out of range"),
                         ("bwd_nblock=8", "out of range"), ("bwd_nblock=48", "out of range"), ("chunk=32", "bad item"),
                         ("bwd_warps=x", "bad item")):
            monkeypatch.setenv("MDM_SSD_TUNE", bad)
            with pytest.raises(ValueError, match=msg):
                tuning()

    def test_backward_uses_the_forwards_launch_settings(self, monkeypatch):
        # the backward runs after the caller's scope (which set the environment) has ended
        import kernels.ssd.triton_scan as ts

        seen = []
        real = ts.ssd_bwd_triton

        def spy(*args, **kwargs):
            seen.append(kwargs)
            return real(*args, **kwargs)

        monkeypatch.setattr(ts, "ssd_bwd_triton", spy)
        args, kw = make_inputs(1, 40, 2, 32, 1, 16, seed=5, opts=("D1", "z"))
        leaves = [t.clone().requires_grad_() for t in args]
        monkeypatch.setenv("MDM_SSD_TUNE", "bwd_chunk=16,bwd_warps=2")
        monkeypatch.setenv("MDM_SSD_HEADDIM_BLOCK", "16")
        y = ts.ssd_scan_triton(*leaves, **kw, chunk_size=32)
        monkeypatch.delenv("MDM_SSD_TUNE")
        monkeypatch.delenv("MDM_SSD_HEADDIM_BLOCK")
        y.sum().backward()
        assert seen == [dict(block_p=16, tune={"bwd_chunk": 16, "bwd_warps": 2, "fwd_parallel": 0, "bwd_parallel": 0})]
        ref = [t.clone().requires_grad_() for t in args]
        ssd_scan_reference(*ref, **kw).sum().backward()
        for a, b in zip(leaves, ref):
            assert rel_err(a.grad, b.grad) < 1e-5

    def test_launch_defaults(self):
        # the measured defaults on CUDA (benchmarks/gpu_results.md); what MDM_SSD_TUNE forces wins;
        # nothing is added on CPU (torch.device("cuda") is only a name here: no GPU is touched)
        from kernels.ssd.triton_fwd import launch_settings

        gpu, cpu = torch.device("cuda", 0), torch.device("cpu")
        assert launch_settings({}, gpu) == dict(fwd_parallel=0, fwd_chunk=32, fwd_warps=4, bwd_parallel=1)
        assert launch_settings({"parallel": 1}, gpu) == dict(parallel=1, fwd_parallel=1, bwd_parallel=1)
        assert launch_settings({"parallel": 0}, gpu) == dict(parallel=0, fwd_parallel=0, fwd_chunk=32, fwd_warps=4,
                                                             bwd_parallel=0)
        assert launch_settings({"parallel": 1, "bwd_parallel": 0}, gpu) == dict(parallel=1, fwd_parallel=1,
                                                                                bwd_parallel=0)
        assert launch_settings({"fwd_chunk": 64, "bwd_parallel": 0}, gpu) == dict(fwd_chunk=64, fwd_warps=4,
                                                                                  fwd_parallel=0, bwd_parallel=0)
        assert launch_settings({}, cpu) == dict(fwd_parallel=0, bwd_parallel=0)
        assert launch_settings({"bwd_chunk": 16, "bwd_parallel": 1}, cpu) == dict(bwd_chunk=16, fwd_parallel=0,
                                                                                  bwd_parallel=1)

    def test_headdim_block_choice(self, monkeypatch):
        from kernels.ssd.triton_fwd import headdim_block

        monkeypatch.delenv("MDM_SSD_HEADDIM_BLOCK", raising=False)
        assert headdim_block(64, 4, torch.device("cpu")) == 64  # no split off CUDA
        assert headdim_block(40, 4, torch.device("cpu")) == 64  # one block, masked
        assert headdim_block(64, 4, torch.device("cpu"), block_p=128) == 64  # never wider than headdim
        for bad in (8, 24):
            with pytest.raises(ValueError, match="power of two >= 16"):
                headdim_block(64, 4, torch.device("cpu"), block_p=bad)
        monkeypatch.setenv("MDM_SSD_HEADDIM_BLOCK", "32")
        assert headdim_block(64, 4, torch.device("cpu")) == 32

    def test_inputs_as_views_into_one_projection(self):
        # as in the mixer: x, dt, B, C, z are slices of one (batch, seqlen, width) tensor, so dt's
        # strides are not those of a contiguous (batch, seqlen, nheads) tensor (nor of ddt)
        b, L, h, p, g, n = 2, 19, 2, 4, 1, 3
        args, kw = make_inputs(b, L, h, p, g, n, seed=31, opts=("z", "D1", "bias", "softplus", "order"))
        x, dt, A, B, C = args
        proj = torch.cat([x.flatten(2), dt, B.flatten(2), C.flatten(2), kw["z"].flatten(2)], dim=-1)
        proj.requires_grad_()
        px, pdt, pB, pC, pz = torch.split(proj, [h * p, h, g * n, g * n, h * p], dim=-1)
        assert pdt.stride(1) == proj.shape[-1]
        rest = {k: v for k, v in kw.items() if k != "z"}
        y = ssd_scan(px.unflatten(-1, (h, p)), pdt, A, pB.unflatten(-1, (g, n)), pC.unflatten(-1, (g, n)),
                     z=pz.unflatten(-1, (h, p)), **rest, chunk_size=16, backend="triton")
        wy = torch.randn(y.shape, generator=torch.Generator().manual_seed(2))
        (y * wy).sum().backward()
        leaves = [t.clone().requires_grad_() for t in (x, dt, B, C, kw["z"])]
        yr = ssd_scan_reference(*leaves[:2], A, *leaves[2:4], z=leaves[4], **rest)
        (yr * wy).sum().backward()
        assert rel_err(y, yr) < 1e-5
        expected = torch.cat([t.grad.flatten(2) for t in leaves], dim=-1)
        assert rel_err(proj.grad, expected) < 1e-5

    def test_deterministic_backward_is_bitwise_repeatable(self):
        args, kw = make_inputs(1, 21, 4, 4, 1, 4, seed=5, opts=("z", "D1", "init"))
        from kernels.ssd.triton_scan import ssd_scan_triton

        runs = [run_with_grads(ssd_scan_triton, args, kw, chunk_size=16, deterministic=True)[2] for _ in range(2)]
        for name in runs[0]:
            assert torch.equal(runs[0][name], runs[1][name]), name

    def test_float16_forward(self):
        args, kw = make_inputs(1, 40, 2, 16, 1, 16, seed=8, opts=("D1", "z", "bias", "softplus", "order"))
        half = tuple(t.half() for t in (args[0], args[1], args[3], args[4]))
        y = ssd_scan(half[0], half[1], args[2], half[2], half[3], **dict(kw, z=kw["z"].half()),
                     chunk_size=16, backend="triton")
        assert y.dtype == torch.float16
        assert rel_err(y, ssd_scan_reference(*args, **kw)) < 3e-3

    def test_multi_direction_matches_separate_reference_calls(self, algo):
        K, b, L, h, p, g, n = 3, 1, 27, 2, 4, 1, 3
        per = [make_inputs(b, L, h, p, g, n, seed=40 + k, opts=("z", "D1", "bias", "softplus", "init"))
               for k in range(K)]
        orders = [None, torch.arange(L - 1, -1, -1), torch.randperm(L, generator=torch.Generator().manual_seed(9))]
        seq_idx = (torch.arange(L) >= 11).long()[None]
        stacked = [torch.stack([per[k][0][i] for k in range(K)]) for i in range(5)]
        kws = {name: torch.stack([per[k][1][name] for k in range(K)]) for name in ("z", "D", "dt_bias", "initial_states")}

        def multi(x, dt, A, B, C, **kw):
            return ssd_scan_multi(x, dt, A, B, C, **kw, scan_order=orders, seq_idx=seq_idx, dt_softplus=True,
                                  chunk_size=16, backend="triton")

        y, s, got = run_with_grads(multi, stacked, kws)
        g_ = torch.Generator().manual_seed(1)
        wy, ws = torch.randn(y.shape, generator=g_), torch.randn(s.shape, generator=g_)
        for k in range(K):
            args_k, kw_k = per[k]
            yr, sr = ssd_scan_reference(*args_k, **kw_k, scan_order=orders[k], seq_idx=seq_idx,
                                        return_final_states=True)
            assert rel_err(y[k], yr) < 1e-5 and rel_err(s[k], sr) < 1e-5, k
        # gradients: the same weights, direction by direction, through the reference
        for k in range(K):
            args_k, kw_k = per[k]
            leaves = [t.clone().requires_grad_() for t in args_k]
            kl = {n_: v.clone().requires_grad_() for n_, v in kw_k.items() if torch.is_tensor(v)}
            yr, sr = ssd_scan_reference(*leaves, **kl, dt_softplus=True, scan_order=orders[k], seq_idx=seq_idx,
                                        return_final_states=True)
            ((yr * wy[k]).sum() + (sr * ws[k]).sum()).backward()
            for name, leaf in list(zip(("x", "dt", "A", "B", "C"), leaves)) + list(kl.items()):
                assert rel_err(got[name][k], leaf.grad) < 1e-5, (k, name)

    def test_multi_direction_shared_parameters(self):
        # A, D, dt_bias shared by the directions (their gradients sum over directions)
        K, L, h = 2, 23, 2
        (x, dt, A, B, C), kw = make_inputs(K, L, h, 4, 1, 3, seed=12, opts=("D2", "bias", "softplus"))
        stacked = (x.unsqueeze(1), dt.unsqueeze(1), A, B.unsqueeze(1), C.unsqueeze(1))  # K on dim 0, batch 1
        orders = torch.stack([torch.arange(L - 1, -1, -1), torch.randperm(L, generator=torch.Generator().manual_seed(3))])
        res = {}
        for backend in ("triton", "torch"):
            leaves = [t.clone().requires_grad_() for t in (*stacked, kw["D"], kw["dt_bias"])]
            y = ssd_scan_multi(*leaves[:5], D=leaves[5], dt_bias=leaves[6], dt_softplus=True, scan_order=orders,
                               chunk_size=16, backend=backend)
            (y * torch.linspace(-1, 1, y.numel()).view(y.shape)).sum().backward()
            res[backend] = (y, [t.grad for t in leaves])
        assert rel_err(res["triton"][0], res["torch"][0]) < 1e-5
        for i, (a, b) in enumerate(zip(res["triton"][1], res["torch"][1])):
            assert rel_err(a, b) < 1e-5, i

    def test_matches_mamba_ssm_chunk_scan_combined_ref(self):
        from kernels.mamba_ssm_compat import import_mamba_ssm

        import_mamba_ssm()
        from mamba_ssm.ops.triton.ssd_combined import ssd_chunk_scan_combined_ref

        args, kw = make_inputs(2, 64, 4, 8, 2, 8, seed=22, opts=("D2", "z", "bias", "softplus"))
        expected = ssd_chunk_scan_combined_ref(*args, 16, **kw)
        assert rel_err(ssd_scan(*args, **kw, chunk_size=32, backend="triton"), expected) < 1e-5

    def test_dispatch(self):
        args, kw = make_inputs(1, 19, 2, 4, 1, 3, seed=2, opts=("D1",))
        y = ssd_scan(*args, **kw, chunk_size=16, backend="triton")
        torch.testing.assert_close(y, ssd_scan(*args, **kw, backend="torch"), rtol=1e-5, atol=1e-5)
        # auto picks torch for CPU tensors even when the interpreter could run Triton
        torch.testing.assert_close(ssd_scan(*args, **kw, backend="auto"), ssd_scan(*args, **kw, backend="torch"))
        with pytest.raises(NotImplementedError, match="float64"):
            ssd_scan(*(t.double() for t in args), backend="triton")


def test_multi_torch_backend_and_argument_checks():
    K, L = 2, 30
    per = [make_inputs(2, L, 4, 3, 2, 5, seed=60 + k, opts=("z", "D1", "init")) for k in range(K)]
    orders = [torch.randperm(L, generator=torch.Generator().manual_seed(k)) for k in range(K)]
    lists = [[per[k][0][i] for k in range(K)] for i in range(5)]
    A = torch.stack(lists[2])
    y, s = ssd_scan_multi(lists[0], lists[1], A, lists[3], lists[4], D=torch.stack([per[k][1]["D"] for k in range(K)]),
                          z=[per[k][1]["z"] for k in range(K)],
                          initial_states=[per[k][1]["initial_states"] for k in range(K)], scan_order=orders,
                          return_final_states=True, chunk_size=16, backend="torch")
    for k in range(K):
        yr, sr = ssd_scan_reference(*per[k][0], **per[k][1], scan_order=orders[k], return_final_states=True)
        assert rel_err(y[k], yr) < 1e-5 and rel_err(s[k], sr) < 1e-5
    with pytest.raises(ValueError, match="dt must have a leading K = 2"):
        ssd_scan_multi(torch.stack(lists[0]), torch.stack(lists[1])[:1], A, torch.stack(lists[3]),
                       torch.stack(lists[4]), backend="torch")
    with pytest.raises(ValueError, match="scan_order must be a permutation"):
        ssd_scan_multi(lists[0], lists[1], A, lists[3], lists[4], scan_order=[None, torch.zeros(L, dtype=torch.long)],
                       backend="torch")


def test_compiled_kernels_refuse_cpu_tensors():
    with _kernel_mode(interpret=False):
        args, _ = make_inputs(1, 5, 2, 2, 1, 2, seed=0)
        with pytest.raises(NotImplementedError, match="CUDA tensors.*backend='torch'"):
            ssd_scan(*args, backend="triton")


# ----- on a GPU (benchmarks/gpu_check.sh): compiled kernels vs the reference ------------------

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.fixture(scope="class")
def compiled():
    with _kernel_mode(interpret=False):
        yield


@pytest.mark.gpu
@cuda
@pytest.mark.usefixtures("compiled")
class TestGPU:
    # each case compiles its own kernel specializations (~10-20 s of Triton compilation on an H100 node)
    @pytest.mark.parametrize("opts,dtype,tol", [
        (("D1", "z", "bias", "softplus", "init", "order"), torch.float32, 1e-4),
        (("D1", "z", "bias", "softplus", "init", "order"), torch.bfloat16, 3e-2),
        (("D2", "seq", "flip", "init"), torch.float32, 1e-4),
        ((), torch.bfloat16, 3e-2),
    ], ids=["gated-order-fp32", "gated-order-bf16", "seq-flip-fp32", "plain-bf16"])
    def test_forward_backward_vs_reference(self, opts, dtype, tol):
        args, kw = make_inputs(2, 1000, 8, 64, 2, 64, seed=1, opts=opts, device="cuda")
        low = lambda t: t.to(dtype) if t.is_floating_point() and t.dim() > 1 else t  # noqa: E731
        largs = tuple(low(t) if i != 2 else t for i, t in enumerate(args))
        lkw = {k: (low(v) if k in ("z",) else v) for k, v in kw.items()}
        from kernels.ssd.triton_scan import ssd_scan_triton

        # the reference in float32 on the same (rounded) inputs; float64 would be slow on GPUs
        ref_args = tuple(t.float() if t.is_floating_point() else t for t in largs)
        ref_kw = {k: (v.float() if torch.is_tensor(v) and v.is_floating_point() else v) for k, v in lkw.items()}
        yr, sr, ref = run_with_grads(ssd_scan_reference, ref_args, ref_kw)
        for det in (False, True):
            y, s, got = run_with_grads(ssd_scan_triton, largs, lkw, chunk_size=64, deterministic=det)
            assert rel_err(y, yr) < tol and rel_err(s, sr) < tol
            for name in ref:
                assert rel_err(got[name], ref[name]) < (tol if dtype == torch.float32 else 5e-2), (name, det)

    def test_headdim_blocks_bf16(self, monkeypatch):
        args, kw = make_inputs(2, 1000, 8, 64, 2, 64, seed=4, opts=("D2", "z", "bias", "softplus", "init", "order"),
                               device="cuda")
        from kernels.ssd.triton_scan import ssd_scan_triton

        bf = torch.bfloat16
        largs = tuple(t.to(bf) if i != 2 else t for i, t in enumerate(args))
        lkw = dict(kw, z=kw["z"].to(bf))
        runs = {}
        for bp in (64, 16):  # one block per head (the reference here) vs 4 headdim blocks
            monkeypatch.setenv("MDM_SSD_HEADDIM_BLOCK", str(bp))
            runs[bp] = run_with_grads(ssd_scan_triton, largs, lkw, chunk_size=64, deterministic=True)
        ref, got = runs[64], runs[16]
        assert rel_err(got[0], ref[0]) < 1e-2 and rel_err(got[1], ref[1]) < 1e-2
        for name in ref[2]:
            assert rel_err(got[2][name], ref[2][name]) < 2e-2, name

    def test_parallel_matches_sequential_bf16(self, monkeypatch):
        # the chunk-parallel kernels (MDM_SSD_TUNE=parallel=1; also with the backward's dstate in
        # blocks of 32) against the sequential ones, 4 directions with their orders, seq_idx, every
        # option (the defaults, which mix the two, are tested against the reference above)
        K, L = 4, 3001
        args, kw = make_inputs(2, L, 8, 64, 2, 64, seed=6, opts=("D2", "z", "bias", "softplus", "init", "seq"),
                               device="cuda")
        orders = torch.stack([torch.arange(L, device="cuda"), torch.arange(L - 1, -1, -1, device="cuda"),
                              torch.randperm(L, device="cuda"), torch.randperm(L, device="cuda")])
        bf = torch.bfloat16
        stack = lambda t: torch.stack([t * (1 + 0.1 * k) for k in range(K)])  # noqa: E731
        x, dt, A, B, C = args
        base = dict(x=stack(x).to(bf), dt=stack(dt), B=stack(B).to(bf), C=stack(C).to(bf), z=stack(kw["z"]).to(bf),
                    D=stack(kw["D"]), dt_bias=stack(kw["dt_bias"]), initial_states=stack(kw["initial_states"]))
        res = {}
        tunes = ("fwd_parallel=0,bwd_parallel=0", "parallel=1", "parallel=1,bwd_nblock=32")
        for tune in tunes:
            monkeypatch.setenv("MDM_SSD_TUNE", tune)
            leaves = {n: t.detach().clone().requires_grad_() for n, t in base.items()}
            y, s = ssd_scan_multi(leaves["x"], leaves["dt"], A, leaves["B"], leaves["C"], D=leaves["D"], z=leaves["z"],
                                  dt_bias=leaves["dt_bias"], dt_softplus=True, initial_states=leaves["initial_states"],
                                  seq_idx=kw["seq_idx"], scan_order=orders, return_final_states=True,
                                  deterministic=True, backend="triton")
            g = torch.Generator(device="cuda").manual_seed(0)
            ((y.float() * torch.randn(y.shape, device="cuda", generator=g)).sum()
             + (s * torch.randn(s.shape, device="cuda", generator=g)).sum()).backward()
            res[tune] = (y, s, {n: t.grad for n, t in leaves.items()})
        y0, s0, g0 = res[tunes[0]]
        for tune in tunes[1:]:
            y1, s1, g1 = res[tune]
            assert rel_err(y1, y0) < 1e-2 and rel_err(s1, s0) < 1e-2, tune
            for name in g0:
                assert rel_err(g1[name], g0[name]) < 2e-2, (tune, name)

    def test_multi_direction_bf16(self):
        K, L = 4, 2048
        args, kw = make_inputs(2, L, 8, 64, 1, 64, seed=3, opts=("D1", "bias", "softplus"), device="cuda")
        x, dt, A, B, C = args
        orders = [None, torch.arange(L - 1, -1, -1, device="cuda"), torch.randperm(L, device="cuda"),
                  torch.randperm(L, device="cuda")]
        bf = torch.bfloat16
        stack = lambda t: torch.stack([t * (1 + 0.1 * k) for k in range(K)]).to(bf)  # noqa: E731
        y = ssd_scan_multi(stack(x), stack(dt), A, stack(B), stack(C), **kw, scan_order=orders, backend="triton")
        for k in range(K):
            yk = ssd_scan(*(t * (1 + 0.1 * k) for t in (x, dt)), A, *(t * (1 + 0.1 * k) for t in (B, C)), **kw,
                          scan_order=orders[k], backend="torch")
            assert rel_err(y[k], yk) < 3e-2, k
