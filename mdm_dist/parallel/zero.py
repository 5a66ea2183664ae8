"""DeepSpeed ZeRO: the generated DeepSpeed config, and the model built partitioned and ZeRO-3-safe.

* :func:`deepspeed_config` turns the YAML's ``train`` and ``parallel`` sections into a DeepSpeed
  config dict; a user's JSON (``parallel.deepspeed_config``) is merged over it, key by key.
* :func:`build_model_zero` constructs the MDM inside ``deepspeed.zero.Init``: every module's
  parameters are partitioned across the ranks as soon as its constructor returns, and the
  model-level initialization (``init_weights``) then runs one module at a time on gathered
  parameters (rank 0's values are kept), so a 7B model never exists whole on one rank; the most
  gathered at once is one module with its children (the VAE, or one Mamba mixer, or the
  backbone's own embeddings and heads). The result is the same model, parameter for parameter,
  as ``build_model`` with the same seed.
* :func:`make_zero3_safe` fixes the parameters used outside their module's forward, which ZeRO-3
  would otherwise not gather:
  - ``Mamba2Mixer`` reads ``conv1d.weight``/``bias`` directly (``F.conv1d``, also in the sequence
    parallel mixer): each mixer becomes a ZeRO-3 *leaf module*, so its pre-forward hook gathers
    all of its parameters, children included;
  - ``UnifiedVAE.pos_emb``/``modality_emb`` are used by ``encode_text``/``encode_image``/
    ``decode_*``, which are methods, not ``forward``: the VAE's class is swapped for a subclass
    whose public methods run through ``nn.Module.__call__`` (so its hooks fire) and
    dispatch to the original method;
  - ``MDMBackbone.txt_pos``/``img_pos``/``sep``/``row_pad``/``tail_pad``/``img_mask`` are used in
    ``embed()``, which runs inside ``MDMBackbone.forward``: ZeRO-3 gathers a module's own
    parameters for the whole of its forward (and again for its backward), so they need nothing;
    ``tests/test_parallel_zero.py`` checks this with persistence disabled
    (``stage3_param_persistence_threshold: 0``) so that no parameter is kept gathered by size.
* A_log, D and dt_bias stay float32. bf16 training has two modes (``train.mixed_precision``):
  ``autocast`` (default) keeps every parameter in fp32 in ZeRO-3's partitions and runs the
  forward under ``torch.autocast(bfloat16)`` (DeepSpeed's ``torch_autocast`` section), so matmuls
  and convs run in bf16 while the SSM parameters and the scan's decay exponents stay fp32; the
  Linear / Conv weights are all-gathered and reduce-scattered in bf16 (their ``comm_dtype``).
  ``bf16_weights`` is DeepSpeed's bf16 mode: ``zero.Init(dtype=bfloat16)`` stores bf16 working
  copies of every parameter, these three included (fp32 master copies in the optimizer).
"""

from __future__ import annotations

import contextlib
import copy
import functools
import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mdm_dist.config import Config, ConfigError
from mdm_dist.models.mamba2 import Mamba2Mixer, keep_fp32_
from mdm_dist.models.mdm import MDM
from mdm_dist.models.vae import UnifiedVAE
from mdm_dist.parallel.groups import ensure_deepspeed_comm


# ----------------------------------------------------------------------------------------------
# Config
# ----------------------------------------------------------------------------------------------


def _merge(base: dict, over: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def use_bf16(cfg: Config, device_type: str) -> bool:
    """bf16 on GPU (``train.dtype`` auto or bfloat16), fp32 on CPU or with ``train.dtype: float32``.
    On CPU, ``train.dtype: bfloat16`` is accepted with ``train.mixed_precision: autocast`` (CPU
    autocast supports bf16: faster than fp32 on CPUs with native bf16, see
    :func:`mdm_dist.train.precision.cpu_has_native_bf16`, which ``launch/demo.py`` uses to
    choose; emulated and slow on others)."""
    if cfg.train.dtype == "float32":
        return False
    if cfg.train.dtype == "bfloat16" and device_type == "cpu":
        if cfg.train.mixed_precision != "autocast":
            raise ConfigError("'train.dtype' = bfloat16 with 'train.mixed_precision' = bf16_weights needs a GPU; "
                              "use train.mixed_precision=autocast, or train.dtype auto / float32 on CPU")
        return True
    return device_type != "cpu"


def deepspeed_config(cfg: Config, world_size: int, device_type: str = "cpu") -> dict[str, Any]:
    """The DeepSpeed config for ``cfg`` on ``world_size`` ranks (data x sequence parallel).

    Gradient accumulation = ``global_batch_size / (micro_batch_size * dp)`` with
    ``dp = world_size / parallel.sequence_parallel``. DeepSpeed's data-parallel world is every rank
    (the ranks of a sequence-parallel group see the same samples, see ``groups.py``), so its
    ``train_batch_size`` counts each sample once per SP rank: ``global_batch_size * sp``. The
    optimizer and the LR schedule are the trainer's (a client ``torch.optim.AdamW``, or DeepSpeed's
    ``MuonWithAuxAdam`` under ``train.optimizer: muon``, with reduce-scatter off as its ZeRO-3
    path requires), hence ``zero_allow_untested_optimizer``. ``parallel.deepspeed_config`` names a JSON file merged
    over the result (nested keys one by one).
    """
    t, p = cfg.train, cfg.parallel
    sp = p.sequence_parallel
    if world_size % sp:
        raise ConfigError(
            f"world size {world_size} is not divisible by 'parallel.sequence_parallel' = {sp}"
        )
    dp = world_size // sp
    if t.global_batch_size % (t.micro_batch_size * dp):
        raise ConfigError(
            f"'train.global_batch_size' = {t.global_batch_size} must be a multiple of "
            f"'train.micro_batch_size' ({t.micro_batch_size}) x data-parallel size ({dp} = "
            f"{world_size} ranks / sequence_parallel {sp})"
        )
    gas = t.global_batch_size // (t.micro_batch_size * dp)
    bf16 = use_bf16(cfg, device_type)
    ds: dict[str, Any] = {
        "train_batch_size": t.micro_batch_size * gas * world_size,
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": gas,
        "gradient_clipping": t.grad_clip,
        "bf16": {"enabled": bf16 and t.mixed_precision == "bf16_weights"},
        "torch_autocast": {"enabled": bf16 and t.mixed_precision == "autocast", "dtype": "bfloat16"},
        "fp16": {"enabled": False},
        "zero_optimization": {
            "stage": p.zero_stage,
            "contiguous_gradients": True,
            "overlap_comm": device_type != "cpu",
            "reduce_bucket_size": 5e7,
            "stage3_prefetch_bucket_size": 5e7,
            # DeepSpeed's default keeps parameters under 1e5 elements whole on every rank, and
            # after each step re-gathers every one of them with its own collective: ~0.3 ms each
            # on gloo, 70 ms a step for the tiny model's ~190 small parameters (30% of its step).
            # On CPU none persists; each module's parameters are gathered in one collective.
            "stage3_param_persistence_threshold": 1e5 if device_type != "cpu" else 0,
            "stage3_gather_16bit_weights_on_model_save": False,
        },
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    if t.optimizer == "muon":
        # DeepSpeed's ZeRO-3 Muon path gathers whole gradients (it refuses reduce-scatter) and would
        # take its clipping norm over the orthogonalized updates; the trainer clips the raw
        # gradient before Muon instead (mdm_dist/train/optim.py: clip_before_muon)
        ds["zero_optimization"]["reduce_scatter"] = False
        ds["gradient_clipping"] = 0.0
    if p.deepspeed_config:
        path = Path(p.deepspeed_config)
        if not path.is_file():
            raise ConfigError(f"'parallel.deepspeed_config' = {p.deepspeed_config!r}: no such file")
        try:
            user = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ConfigError(f"'parallel.deepspeed_config' = {p.deepspeed_config!r}: not valid JSON: {e}") from e
        if not isinstance(user, dict):
            raise ConfigError(f"'parallel.deepspeed_config' = {p.deepspeed_config!r}: must hold a JSON object")
        ds = _merge(ds, user)
    return ds


# ----------------------------------------------------------------------------------------------
# ZeRO-3 safety
# ----------------------------------------------------------------------------------------------

_VAE_METHODS = ("encode_image", "decode_image", "encode_text", "decode_text")


class Zero3UnifiedVAE(UnifiedVAE):
    """UnifiedVAE whose public methods run inside ``forward`` so ZeRO-3 gathers its own
    parameters (pos_emb, modality_emb) for them. Same parameters and names as UnifiedVAE."""

    def forward(self, method: str, *args, **kwargs):
        return getattr(UnifiedVAE, method)(self, *args, **kwargs)

    def encode_image(self, x):
        return self("encode_image", x)

    def decode_image(self, z, grid=None):
        return self("decode_image", z, grid)

    def encode_text(self, ids):
        return self("encode_text", ids)

    def decode_text(self, z):
        return self("decode_text", z)


def make_zero3_safe(model: nn.Module) -> nn.Module:
    """Mark every Mamba2Mixer a ZeRO-3 leaf module and route the VAE's methods through its
    ``forward`` (see the module docstring). Harmless without ZeRO-3; call before
    ``deepspeed.initialize``."""
    from deepspeed.utils import set_z3_leaf_module

    for module in model.modules():
        if isinstance(module, Mamba2Mixer):
            set_z3_leaf_module(module, True)
        elif type(module) is UnifiedVAE:
            module.__class__ = Zero3UnifiedVAE
    return model


# ----------------------------------------------------------------------------------------------
# Building partitioned
# ----------------------------------------------------------------------------------------------


def _reset_params(module: nn.Module) -> list[nn.Parameter]:
    """The parameters that ``module.reset_parameters`` may write: its own and its children's
    (``MDMBackbone`` touches only its embeddings and direct children) or, for any other module,
    the whole subtree (UnifiedVAE and Mamba2Mixer re-initialize their descendants)."""
    from mdm_dist.models.backbone import MDMBackbone

    if isinstance(module, MDMBackbone):
        params = list(module.parameters(recurse=False))
        for child in module.children():
            params += list(child.parameters(recurse=False))
        return params
    return list(module.parameters())


_gather_depth = 0  # > 0 inside a gathered reset: nested resets run on the already gathered tensors


def _reset_gathered(module: nn.Module, reset) -> None:
    """Run ``reset(module)`` with the parameters it may write gathered; rank 0's values win."""
    import deepspeed

    global _gather_depth
    if _gather_depth:
        return reset(module)
    params = _reset_params(module)
    _gather_depth += 1
    try:
        with deepspeed.zero.GatheredParameters(params, modifier_rank=0, enabled=bool(params)):
            reset(module)
    finally:
        _gather_depth -= 1


@contextlib.contextmanager
def _gathered_model_resets():
    """While active, the ``reset_parameters`` of the model classes (mdm_dist.models) gather first.

    Needed under ``zero.Init``: a constructor such as ``Mamba2Mixer.__init__`` calls
    ``reset_parameters``, which re-initializes children (in_proj, conv1d, ...) that zero.Init has
    already partitioned when their own constructors returned.
    """
    from mdm_dist.models import attention, backbone, mamba2, mdm, vae

    originals = {}
    for mod in (attention, backbone, mamba2, mdm, vae):
        for obj in vars(mod).values():
            if (isinstance(obj, type) and issubclass(obj, nn.Module) and obj.__module__ == mod.__name__
                    and "reset_parameters" in vars(obj)):
                originals[obj] = vars(obj)["reset_parameters"]
    for cls, orig in originals.items():
        cls.reset_parameters = functools.partialmethod(_reset_gathered, orig)
    try:
        yield
    finally:
        for cls, orig in originals.items():
            cls.reset_parameters = orig


def _init_weights_gathered(module: nn.Module) -> None:
    """``mdm.init_weights`` (children before parents) on ZeRO-3-partitioned parameters."""
    for child in module.children():
        _init_weights_gathered(child)
    if hasattr(module, "reset_parameters") and not isinstance(module, MDM):
        _reset_gathered(module, type(module).reset_parameters)


def build_model_zero(cfg: Config, ds_config: dict[str, Any], device: str | torch.device = "cpu") -> MDM:
    """Build the MDM for DeepSpeed: under ``zero.Init`` (partitioned from the start) when
    ``zero_optimization.stage`` is 3, else whole; initialized as ``build_model`` would (call
    ``torch.manual_seed`` with the same seed on every rank first); made ZeRO-3-safe."""
    import deepspeed

    bf16 = bool(ds_config.get("bf16", {}).get("enabled", False))
    dtype = torch.bfloat16 if bf16 else torch.float32
    stage = ds_config.get("zero_optimization", {}).get("stage", 0)
    if stage == 3:
        ensure_deepspeed_comm()
        with _gathered_model_resets():
            # dtype only for bf16: an explicit float32 here changes the initial values (seen with
            # deepspeed 0.19.8), so the model would no longer equal build_model's.
            with deepspeed.zero.Init(config_dict_or_path=ds_config, **({"dtype": dtype} if bf16 else {})):
                model = MDM(cfg)
            _init_weights_gathered(model)
    else:
        from mdm_dist.models.mdm import build_model

        model = build_model(cfg, device=device, dtype=dtype)
        keep_fp32_(model)
    return make_zero3_safe(model)


__all__ = ["Zero3UnifiedVAE", "build_model_zero", "deepspeed_config", "make_zero3_safe", "use_bf16"]
