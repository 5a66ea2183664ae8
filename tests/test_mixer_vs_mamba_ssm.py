"""Our Mamba2Mixer against mamba-ssm's own module ``mamba_ssm.modules.mamba2.Mamba2`` on CPU.

Both modules get the same random float32 weights: the parameter names and layouts coincide
(in_proj rows [z | x | B | C | dt], a depthwise conv over the channels x | B | C, A_log, D and
dt_bias per head, the gated RMSNorm weight normalized in groups of d_inner / ngroups with the
gate applied before the norm, out_proj), so a strict ``load_state_dict`` maps ours onto theirs.
On random inputs the forward output and the gradients with respect to the input and to every
parameter must agree to a relative error bound, for ngroups 1 and 2 and a sequence length that
is not a multiple of the chunk size.

mamba-ssm runs its ``use_mem_eff_path=False`` path: in_proj; its own ``nn.Conv1d`` fallback for
the conv (``causal_conv1d`` is installed without its CUDA extension, so mamba-ssm's import of it
fails); then ``mamba_chunk_scan_combined`` and its ``RMSNormGated``, whose Triton kernels, forward
and backward, run in Triton's interpreter: ``_kernel_mode`` (see tests/test_ssd_triton.py)
re-imports their modules with ``TRITON_INTERPRET=1`` and drops them afterwards. No piece of
mamba-ssm is replaced by a reference function. Three shims, active only inside the fixture, let
its CUDA-minded launch code take CPU tensors without changing what any kernel computes:

* ``torch.cuda.device(None)`` (mamba-ssm enters ``torch.cuda.device(x.device.index)``) is a
  no-op, as torch documents; torch's CUDA build rejects ``None`` on a machine without a GPU;
* ``torch.cuda.get_device_properties`` reports 4 SMs (the backward launchers size their grids
  by the SM count);
* each mamba-ssm autotuner keeps only its first config (the interpreter has no driver to
  benchmark configs with).
"""

from __future__ import annotations

import contextlib
import sys
from types import SimpleNamespace

import pytest
import torch

from mdm_dist.models.mamba2 import Mamba2Mixer
from test_ssd_triton import _kernel_mode, rel_err

MAMBA_MODULES = tuple(
    f"mamba_ssm.ops.triton.{name}"
    for name in ("softplus", "ssd_bmm", "ssd_chunk_state", "ssd_state_passing", "ssd_chunk_scan",
                 "layernorm_gated", "k_activations", "selective_state_update", "ssd_combined")
) + ("mamba_ssm.modules.mamba2",)
SIZES = dict(d_model=64, d_state=16, d_conv=4, expand=2, headdim=16, chunk_size=16)
BATCH, SEQLEN = 2, 37  # 37 = 2 * 16 + 5: a partial last chunk
TOL = 1e-5


@pytest.fixture(scope="module")
def Mamba2():
    """mamba-ssm's Mamba2 class, its Triton kernels interpreted, with the CPU shims above."""
    try:
        from triton.runtime.autotuner import Autotuner

        from kernels.mamba_ssm_compat import import_mamba_ssm

        import_mamba_ssm()
    except ImportError as err:
        pytest.skip(f"mamba_ssm (or triton) cannot be imported here: {err}")

    real_device = torch.cuda.device
    with pytest.MonkeyPatch.context() as mp, _kernel_mode(interpret=True, modules=MAMBA_MODULES):
        mp.setattr(torch.cuda, "device", lambda idx: contextlib.nullcontext() if idx is None else real_device(idx))
        mp.setattr(torch.cuda, "get_device_properties", lambda device=None: SimpleNamespace(multi_processor_count=4))
        for name in MAMBA_MODULES:  # freshly imported by _kernel_mode, dropped again on exit
            for obj in vars(sys.modules[name]).values():
                while obj is not None and not isinstance(obj, Autotuner):
                    obj = getattr(obj, "fn", None)  # through @triton.heuristics wrappers
                if obj is not None:
                    obj.configs = obj.configs[:1]
        yield sys.modules["mamba_ssm.modules.mamba2"].Mamba2


def _random_mixer(ngroups: int, g: torch.Generator) -> Mamba2Mixer:
    """Our mixer with every parameter drawn from g; A_log, D, dt_bias, conv and norm away from init."""
    m = Mamba2Mixer(**SIZES, ngroups=ngroups, proj_bias=True, scan_backend="torch")
    rn = lambda t, scale: torch.randn(t.shape, generator=g) * scale  # noqa: E731
    with torch.no_grad():
        for lin in (m.in_proj, m.out_proj):
            lin.weight.copy_(rn(lin.weight, lin.in_features ** -0.5))
            lin.bias.copy_(rn(lin.bias, 0.1))
        m.conv1d.weight.copy_(rn(m.conv1d.weight, 0.5))
        m.conv1d.bias.copy_(rn(m.conv1d.bias, 0.2))
        m.A_log.copy_(torch.empty(m.A_log.shape).uniform_(-1.0, 2.5, generator=g))  # A in [-12, -0.4]
        m.D.copy_(rn(m.D, 1.0))
        m.dt_bias.copy_(rn(m.dt_bias, 1.0) - 3.0)  # softplus(dt_bias) ~ 0.05
        m.norm.weight.copy_(1 + rn(m.norm.weight, 0.3))
    return m


def _output_and_grads(module: torch.nn.Module, u: torch.Tensor, cotangent: torch.Tensor) -> dict:
    u = u.clone().requires_grad_()
    out = module(u)
    (out * cotangent).sum().backward()
    return {"out": out.detach(), "u.grad": u.grad, **{f"{n}.grad": p.grad for n, p in module.named_parameters()}}


@pytest.mark.parametrize("ngroups", [1, 2])
def test_mixer_matches_mamba_ssm_mamba2(Mamba2, ngroups):
    g = torch.Generator().manual_seed(100 + ngroups)
    ours = _random_mixer(ngroups, g)
    theirs = Mamba2(**SIZES, ngroups=ngroups, bias=True, use_mem_eff_path=False)
    assert not theirs.norm_before_gate and not theirs.D_has_hdim and theirs.rmsnorm
    assert theirs.norm.group_size == ours.norm.group_size and theirs.norm.eps == ours.norm.eps
    theirs.load_state_dict(ours.state_dict(), strict=True)  # same names and shapes, same layouts

    u = torch.randn(BATCH, SEQLEN, SIZES["d_model"], generator=g)
    cotangent = torch.randn(BATCH, SEQLEN, SIZES["d_model"], generator=g)
    got, want = _output_and_grads(ours, u, cotangent), _output_and_grads(theirs, u, cotangent)
    assert got.keys() == want.keys()
    errs = {name: rel_err(got[name], want[name]) for name in want}
    assert max(errs.values()) < TOL, errs  # measured: at most 2e-6 (dt_bias.grad)
