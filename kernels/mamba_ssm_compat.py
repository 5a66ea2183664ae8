"""Make ``import mamba_ssm`` work on machines without its CUDA extensions (tests, CPU boxes).

``mamba_ssm.ops.selective_scan_interface`` does ``import selective_scan_cuda`` unconditionally.
Built with ``MAMBA_SKIP_CUDA_BUILD=TRUE`` that module does not exist, so ``import mamba_ssm``
fails although its pure-PyTorch reference functions (``selective_scan_ref``,
``ssd_minimal_discrete``, ``ssd_chunk_scan_combined_ref``, ``chunk_state_ref`` ...) run fine on
CPU. mdm-dist uses those references to test its own kernels.

:func:`import_mamba_ssm` puts a stand-in module into ``sys.modules`` for each extension that
cannot be imported, and for nothing else: where the real extension imports, it is used and this
module changes nothing. Any function looked up on a stand-in raises a RuntimeError when called,
so a CUDA path can never silently run as a no-op.
"""

from __future__ import annotations

import importlib
import importlib.machinery
import sys
import types

# Only the extension mamba-ssm imports unconditionally. ``causal_conv1d_cuda`` is deliberately
# NOT stubbed: mamba-ssm imports ``causal_conv1d`` inside ``try/except ImportError`` and falls back
# to ``nn.Conv1d`` when it is missing; a stub would make that import succeed and turn the working
# fallback into a RuntimeError.
CUDA_EXTENSIONS = ("selective_scan_cuda",)


class MissingCudaExtension(types.ModuleType):
    """A stand-in for a compiled CUDA extension that is not installed; calling into it raises."""

    def __init__(self, name: str, reason: str):
        super().__init__(name, f"mdm-dist stand-in for the missing CUDA extension {name!r}")
        self.__spec__ = importlib.machinery.ModuleSpec(name, loader=None)
        self.__mdm_stub__ = True
        self._reason = reason

    def __getattr__(self, attr: str):
        if attr.startswith("__"):
            raise AttributeError(attr)
        module, reason = self.__name__, self._reason

        def unavailable(*args, **kwargs):
            raise RuntimeError(
                f"{module}.{attr}() was called, but the CUDA extension {module!r} is not available "
                f"here ({reason}); kernels.mamba_ssm_compat stands in for it only so that "
                "mamba_ssm's pure-PyTorch reference functions can be imported. Use those "
                "references, or kernels.ssd.ssd_scan(..., backend='torch'), on this machine."
            )

        unavailable.__name__ = attr
        return unavailable


def is_stub(module: types.ModuleType) -> bool:
    """True for a stand-in inserted by this module."""
    return bool(getattr(module, "__mdm_stub__", False))


def install_cuda_extension_stubs() -> list[str]:
    """Insert a stand-in for each CUDA extension that fails to import; return their names."""
    stubbed = []
    for name in CUDA_EXTENSIONS:
        if name in sys.modules:
            continue
        try:
            importlib.import_module(name)
        except ImportError as err:  # not built, or built against libraries missing here
            sys.modules[name] = MissingCudaExtension(name, f"{type(err).__name__}: {err}")
            stubbed.append(name)
    return stubbed


def import_mamba_ssm() -> types.ModuleType:
    """``import mamba_ssm`` after stubbing any missing CUDA extension; returns the package.

    Afterwards the reference functions import normally, e.g.
    ``from mamba_ssm.modules.ssd_minimal import ssd_minimal_discrete``.
    """
    install_cuda_extension_stubs()
    return importlib.import_module("mamba_ssm")
