"""Typed configuration: YAML files validated into dataclasses, with dotted overrides.

One config loader for the whole project. A YAML file under ``configs/`` holds sections
(``model``, ``vae``, ``diffusion``, ``train``, ``parallel``, ``data``); each section is a
dataclass below. Loading walks the YAML tree against the dataclass fields and fails with a
:class:`ConfigError` that names the file, the dotted key and what is allowed:

    configs/tiny.yaml: unknown key 'model.n_layer'; allowed keys in 'model': d_model, ...
    configs/tiny.yaml: 'diffusion.objective' = 'dsm' is not allowed; allowed values: se, ddpm

Command-line overrides use dotted keys, ``--set train.lr=3e-4``; the value is parsed as YAML
(so ``true``, ``[1, 2]`` and ``1e-4`` mean what they look like) and validated the same way.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

import yaml

IMAGE_DIRECTIONS = ("row", "row_rev", "col", "col_rev")
TEXT_DIRECTIONS = ("fwd", "rev")


class ConfigError(ValueError):
    """A config file or override is wrong; the message says where and what is allowed."""


# ----------------------------------------------------------------------------------------------
# Sections
# ----------------------------------------------------------------------------------------------


@dataclass
class VAEConfig:
    """UnifiedVAE: conv image stem + text embedding stem -> shared per-token trunk -> (mu, logvar)."""

    image_size: int = 32  # training resolution in pixels (square)
    in_channels: int = 3
    base_channels: int = 32  # width of the first conv stage
    channel_mult: list[int] = field(default_factory=lambda: [1, 2])  # one stage per entry; each
    # stage after the first halves the resolution: downsample = 2 ** (len(channel_mult) - 1)
    num_res_blocks: int = 1  # residual blocks per conv stage
    latent_channels: int = 4  # channels of the conv latent grid (SD-VAE uses 4)
    patch_size: int = 2  # patchify the conv latent grid into tokens of latent_channels * p * p
    d_z: int = 16  # shared latent width of every token, image or text
    trunk_width: int = 128  # width of the shared per-token MLP trunk
    trunk_layers: int = 2
    vocab_size: int = 512  # text vocabulary, special ids included
    pad_id: int = 0
    mask_id: int = 1  # the absorbing "MASK" token of the score-entropy text process
    max_text_len: int = 16
    beta_kl: float = 1e-4  # KL weight in the VAE stage and in pretraining
    logvar_min: float = -30.0
    logvar_max: float = 20.0


@dataclass
class ModelConfig:
    """MDM backbone: Mamba-2 blocks over the joint [time][cat][text][sep][image][pad] sequence."""

    d_model: int = 128
    n_layers: int = 4
    # Mamba-2 mixer
    d_state: int = 16
    d_conv: int = 4
    expand: float = 2.0
    headdim: int = 32
    ngroups: int = 1
    chunk_size: int = 64
    dt_min: float = 1e-3
    dt_max: float = 1e-1
    dt_init_floor: float = 1e-4
    A_init_range: list[float] = field(default_factory=lambda: [1.0, 16.0])
    conv_bias: bool = True
    proj_bias: bool = False
    norm_eps: float = 1e-5
    scan_backend: Literal["auto", "triton", "torch", "reference"] = "auto"
    # Scan switch
    scan_mode: Literal["multi", "cycle"] = "multi"  # multi: every block scans every direction
    # (the paper's scan switch); cycle: block i scans direction i mod n_dir (DiM)
    image_directions: list[str] = field(default_factory=lambda: list(IMAGE_DIRECTIONS))
    share_direction_weights: bool = False  # one mixer for all directions of a block
    direction_combine: Literal["sum", "mean"] = "mean"
    lateral_pad: bool = False  # DiM's learnable pad token at the end of each image row
    long_skip: bool = False  # U-ViT long skips from the first half of the blocks to the second
    # Self-conditioning of the image (Chen et al. 2022, "Analog Bits"): the backbone also reads an
    # estimate of the clean image latents (its own earlier prediction, or zeros) through a
    # zero-initialized projection; mdm_loss makes that estimate with an extra no-grad forward for
    # half the samples, the samplers feed the previous step's estimate
    self_condition: bool = False
    # Masked image tokens in training (MDT, Gao et al. 2023): `image_mask_prob` of the samples whose
    # image is generated see each image token replaced, with probability `image_mask_ratio`, by a
    # learned mask embedding (plus its position embedding); the loss still covers every token, so a
    # masked token must be inferred from the caption and the visible tokens. Sampling never masks.
    image_mask_prob: float = 0.0
    image_mask_ratio: float = 0.5
    # Self-representation alignment (REPA, Yu et al. 2024, with the model itself as the encoder):
    # the image-token states after layer `repr_align_layer` of the pass that generates the image,
    # through a small MLP, are pulled (negative cosine, weight `repr_align_weight`) toward the
    # states after layer `repr_align_target_layer` of a no-grad pass that reads the clean image
    # with the text all MASK (what captioning reads). Layers index `backbone.layers` (Mamba and
    # attention blocks in order). 0 = off.
    repr_align_weight: float = 0.0
    repr_align_layer: int = 1
    repr_align_target_layer: int = 3
    # adaLN conditioning (DiT; SD3's timestep + pooled text vector): every block's normed input is
    # scaled and shifted, and its residual branch gated, by a zero-initialized map of a per-sample
    # vector: both time embeddings + the category embedding + a pooled caption embedding (a
    # per-token MLP of the text latents, averaged). The in-sequence time/category tokens stay.
    adaln: bool = False
    # Hybrid: one bidirectional attention block after every `attention_every` Mamba blocks
    attention_every: int = 0  # 0 = pure Mamba (the paper's configs)
    attn_heads: int = 4
    # Conditioning tokens
    num_categories: int = 4  # class / task categories; index num_categories is the null class
    num_tail_pad: int = 1  # learnable pad tokens at the end of the sequence
    init_std: float = 0.02


@dataclass
class DiffusionConfig:
    """Forward processes, objective and samplers (see mdm_dist/diffusion)."""

    objective: Literal["se", "ddpm"] = "se"
    schedule: Literal["linear", "cosine"] = "cosine"
    beta_start: float = 0.1  # continuous-time linear VP: beta(t) = beta_start + t (beta_end - beta_start)
    beta_end: float = 20.0
    t_eps: float = 1e-3  # t is drawn from [t_eps, 1]
    # training times t = t_eps + (1 - t_eps) u ** (1 / k), u ~ U[0, 1), one k per modality: the
    # density is proportional to (t - t_eps) ** (k - 1); 1 = uniform; k > 1 spends more samples at
    # the noisy end, where the condition decides an image's colour and layout and most caption
    # tokens are masked, so must be read from the image (docs/model.md)
    image_time_power: float = 1.0
    text_time_power: float = 1.0
    text_process: Literal["absorbing", "gaussian"] = "absorbing"
    sedd_eps: float = 1e-3  # log-linear noise: sigma(t) = -log(1 - (1 - sedd_eps) t)
    # absorbing text's log-scores: "conditional" = log p(x0 = y | x_t) + log r(t) (the exact form
    # of the absorbing score, RADD / MDLM: the network gives a distribution, the mass is exact);
    # "free" = SEDD's unconstrained log-scores (the mass must be learned too)
    text_score: Literal["conditional", "free"] = "conditional"
    # what the image head predicts: "eps" (the noise) or "v" = sqrt(abar) eps - sigma z0 (Salimans
    # & Ho 2022); the samplers and the DSM loss convert v to eps, so the weighting below is unchanged
    image_prediction: Literal["eps", "v"] = "eps"
    # per-t weight of the image DSM term under `se`: elbo, eps (1), or v (1 / abar: the x0 error
    # weighted by 1 + SNR, exactly the v-MSE under image_prediction v)
    image_weighting: Literal["elbo", "eps", "v"] = "elbo"
    max_image_weight: float = 5.0  # clamp of the normalized ELBO weight (variance control)
    lambda_se: float = 1.0
    lambda_rec_img: float = 1.0
    lambda_rec_txt: float = 1.0
    p_uncond: float = 0.1  # condition dropout for classifier-free guidance
    task_probs: dict[str, float] = field(
        default_factory=lambda: {"joint": 0.34, "t2i": 0.33, "i2t": 0.33}
    )
    sampler: Literal["dpm2", "ddim"] = "dpm2"
    sample_steps: int = 50
    guidance_scale: float = 1.0
    caption_guidance_scale: float | None = None  # i2t's scale; None: guidance_scale
    # absorbing text sampling: a newly unmasked token is drawn from p0 ** (1 / T), renormalized;
    # 1 = the exact reverse process, < 1 sharper, 0 = the most likely token (greedy)
    text_temperature: float = 1.0


@dataclass
class TrainConfig:
    lr: float = 2e-4
    min_lr: float = 2e-5
    weight_decay: float = 0.03
    betas: list[float] = field(default_factory=lambda: [0.9, 0.99])
    # adamw: AdamW on every parameter; muon: Muon on the hidden weight matrices (their lr is
    # muon_lr, on the same warm-up and cosine), AdamW at lr on the rest (mdm_dist/train/optim.py)
    optimizer: Literal["adamw", "muon"] = "adamw"
    muon_lr: float = 0.02
    muon_momentum: float = 0.95
    warmup_steps: int = 100
    max_steps: int = 1000
    global_batch_size: int = 32
    micro_batch_size: int = 8
    grad_clip: float = 1.0
    activation_checkpointing: Literal["none", "every", "every_k"] = "none"
    checkpoint_every_k: int = 2
    ema_decay: float = 0.9999
    ema_warmup: bool = True  # decay of step k: min(ema_decay, (1 + k) / (10 + k))
    seed: int = 0
    log_every: int = 10
    save_every: int = 500
    sample_every: int = 1000
    max_bad_steps: int = 5
    # Wall-clock budget of the training loop in seconds (0 = none). The run times its first steps,
    # then trains min(max_steps, what fits) steps with its learning-rate schedule ending there; the
    # chosen count is saved in checkpoints, so a resumed run keeps it (mdm_dist/train/budget.py).
    time_budget_s: float = 0.0
    # vae.pt of launch/train_vae.py: the MDM's UnifiedVAE starts from it (its vae section must
    # equal this config's); empty = a randomly initialized VAE (smoke tests only: the stored image
    # latents then come from a different VAE than the one pretraining decodes with).
    vae_checkpoint: str = ""
    dtype: Literal["auto", "float32", "bfloat16"] = "auto"  # auto: bfloat16 on GPU, float32 on CPU
    # How bfloat16 is applied: "autocast" keeps fp32 weights (A_log / D / dt_bias stay fp32 on
    # every path) and runs matmuls and convs in bf16 under torch.autocast, with bf16 parameter
    # communication for Linear / Conv weights; "bf16_weights" stores bf16 working copies of every
    # parameter (DeepSpeed's bf16 mode; fp32 master copies live in the optimizer).
    mixed_precision: Literal["autocast", "bf16_weights"] = "autocast"


@dataclass
class ParallelConfig:
    zero_stage: int = 3
    sequence_parallel: int = 1
    deepspeed_config: str = ""  # path to a user DeepSpeed JSON that overrides the generated one


@dataclass
class DataConfig:
    paths: list[str] = field(default_factory=list)
    proportions: list[float] = field(default_factory=list)
    num_workers: int = 0
    shuffle: bool = True
    tokenizer: str = ""  # tokenizer directory (data_prep/train_tokenizer.py) to decode sampled captions


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    vae: VAEConfig = field(default_factory=VAEConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    name: str = "unnamed"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# ----------------------------------------------------------------------------------------------
# Validation
# ----------------------------------------------------------------------------------------------

_CHOICES: dict[str, tuple[str, ...]] = {
    "model.image_directions": IMAGE_DIRECTIONS,
}
_POSITIVE_INT = {
    "model.d_model", "model.n_layers", "model.d_state", "model.d_conv", "model.headdim",
    "model.ngroups", "model.chunk_size", "model.attn_heads", "model.num_categories",
    "vae.image_size", "vae.in_channels", "vae.base_channels", "vae.latent_channels",
    "vae.patch_size", "vae.d_z", "vae.trunk_width", "vae.vocab_size", "vae.max_text_len",
    "diffusion.sample_steps", "train.global_batch_size", "train.micro_batch_size",
    "parallel.sequence_parallel",
}


def _type_name(tp: Any) -> str:
    if get_origin(tp) is Literal:
        return "one of " + ", ".join(map(str, get_args(tp)))
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, key: str, where: str) -> Any:
    origin = get_origin(tp)
    args = get_args(tp)
    if type(None) in args and len(args) == 2:  # optional: null, or the inner type
        inner = next(a for a in args if a is not type(None))
        return None if value is None else _coerce(value, inner, key, where)
    if origin is Literal:
        allowed = get_args(tp)
        if value not in allowed:
            raise ConfigError(
                f"{where}: '{key}' = {value!r} is not allowed; allowed values: "
                + ", ".join(map(str, allowed))
            )
        return value
    if origin is list:
        (item_tp,) = get_args(tp)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: '{key}' must be a list of {_type_name(item_tp)}, got {value!r}")
        return [_coerce(v, item_tp, f"{key}[{i}]", where) for i, v in enumerate(value)]
    if origin is dict:
        k_tp, v_tp = get_args(tp)
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: '{key}' must be a mapping, got {value!r}")
        return {_coerce(k, k_tp, key, where): _coerce(v, v_tp, f"{key}.{k}", where) for k, v in value.items()}
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: '{key}' must be true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: '{key}' must be an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads '3e-4' (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: '{key}' must be a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: '{key}' must be a string, got {value!r}")
        return value
    raise TypeError(f"unsupported config type {tp} for {key}")


def _build(cls: type, data: Any, prefix: str, where: str) -> Any:
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: '{prefix or 'top level'}' must be a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        section = prefix or "the top level"
        raise ConfigError(
            f"{where}: unknown key '{_join(prefix, unknown[0])}'; allowed keys in '{section}': "
            + ", ".join(fields)
        )
    kwargs = {}
    for name, value in data.items():
        tp = hints[name]
        key = _join(prefix, name)
        if dataclasses.is_dataclass(tp):
            kwargs[name] = _build(tp, value, key, where)
        else:
            kwargs[name] = _coerce(value, tp, key, where)
    return cls(**kwargs)


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def block_kinds(m: ModelConfig) -> list[str]:
    """The backbone's blocks in order (``backbone.layers``): ``"mamba"`` for each of the
    ``n_layers`` Mamba blocks, with an ``"attn"`` after every ``attention_every``-th one but the
    last."""
    kinds: list[str] = []
    for i in range(m.n_layers):
        kinds.append("mamba")
        if m.attention_every and (i + 1) % m.attention_every == 0 and i + 1 < m.n_layers:
            kinds.append("attn")
    return kinds


def _check(cfg: Config, where: str) -> None:
    """Cross-field checks that a single field's type cannot express."""
    for key in _POSITIVE_INT:
        section, name = key.split(".")
        value = getattr(getattr(cfg, section), name)
        if value <= 0:
            raise ConfigError(f"{where}: '{key}' must be > 0, got {value}")
    for key, allowed in _CHOICES.items():
        section, name = key.split(".")
        for v in getattr(getattr(cfg, section), name):
            if v not in allowed:
                raise ConfigError(
                    f"{where}: '{key}' contains {v!r}; allowed values: " + ", ".join(allowed)
                )
    m, v, d = cfg.model, cfg.vae, cfg.diffusion
    if not m.image_directions:
        raise ConfigError(f"{where}: 'model.image_directions' must name at least one direction")
    d_inner = int(m.expand * m.d_model)
    if d_inner % m.headdim:
        raise ConfigError(
            f"{where}: expand * d_model = {d_inner} must be divisible by 'model.headdim' = {m.headdim}"
        )
    if (d_inner // m.headdim) % m.ngroups:
        raise ConfigError(f"{where}: nheads = {d_inner // m.headdim} must be divisible by 'model.ngroups'")
    if m.attention_every and m.d_model % m.attn_heads:
        raise ConfigError(f"{where}: 'model.d_model' must be divisible by 'model.attn_heads'")
    if m.attention_every < 0:
        raise ConfigError(f"{where}: 'model.attention_every' must be >= 0 (0 = pure Mamba)")
    down = 2 ** (len(v.channel_mult) - 1)
    if v.image_size % (down * v.patch_size):
        raise ConfigError(
            f"{where}: 'vae.image_size' = {v.image_size} must be divisible by the VAE downsample "
            f"({down}) times 'vae.patch_size' ({v.patch_size})"
        )
    for name in ("pad_id", "mask_id"):
        if not 0 <= getattr(v, name) < v.vocab_size:
            raise ConfigError(f"{where}: 'vae.{name}' must lie in [0, vae.vocab_size)")
    if v.pad_id == v.mask_id:
        raise ConfigError(f"{where}: 'vae.pad_id' and 'vae.mask_id' must differ")
    bad = set(d.task_probs) - {"joint", "t2i", "i2t"}
    if bad:
        raise ConfigError(
            f"{where}: 'diffusion.task_probs' has unknown task {sorted(bad)[0]!r}; allowed: joint, t2i, i2t"
        )
    if not d.task_probs or sum(d.task_probs.values()) <= 0:
        raise ConfigError(f"{where}: 'diffusion.task_probs' must have a positive total")
    if d.objective == "ddpm" and d.text_process != "gaussian":
        raise ConfigError(
            f"{where}: 'diffusion.objective' = ddpm regresses Gaussian noise for both modalities; "
            "set 'diffusion.text_process' to gaussian"
        )
    if not 0.0 <= d.p_uncond < 1.0:
        raise ConfigError(f"{where}: 'diffusion.p_uncond' must lie in [0, 1)")
    if not 0.0 <= m.image_mask_prob <= 1.0:
        raise ConfigError(f"{where}: 'model.image_mask_prob' = {m.image_mask_prob}; it must lie in [0, 1] "
                          "(0 = no masked-token training)")
    if not 0.0 < m.image_mask_ratio < 1.0:
        raise ConfigError(f"{where}: 'model.image_mask_ratio' = {m.image_mask_ratio}; it must lie in (0, 1)")
    if not (m.repr_align_weight >= 0.0 and math.isfinite(m.repr_align_weight)):
        raise ConfigError(f"{where}: 'model.repr_align_weight' = {m.repr_align_weight}; it must be a finite "
                          "number >= 0 (0 = no representation alignment)")
    if m.repr_align_weight > 0:
        n_layers = len(block_kinds(m))
        for key in ("repr_align_layer", "repr_align_target_layer"):
            k = getattr(m, key)
            if not 0 <= k < n_layers:
                raise ConfigError(f"{where}: 'model.{key}' = {k}; allowed values: 0 .. {n_layers - 1} "
                                  f"(the index of a block in backbone.layers: {n_layers} Mamba and attention "
                                  "blocks in order)")
    for key in ("image_time_power", "text_time_power"):
        k = getattr(d, key)
        if not (k > 0.0 and math.isfinite(k)):
            raise ConfigError(f"{where}: 'diffusion.{key}' = {k}; it must be a finite number > 0 "
                              "(1 = uniform times, 2 = density proportional to t)")
    if not d.text_temperature >= 0.0:
        raise ConfigError(f"{where}: 'diffusion.text_temperature' = {d.text_temperature}; it must be >= 0 "
                          "(1 = exact sampling, 0 = greedy)")
    if not (cfg.train.time_budget_s >= 0.0 and math.isfinite(cfg.train.time_budget_s)):
        raise ConfigError(f"{where}: 'train.time_budget_s' = {cfg.train.time_budget_s}; it must be a finite number "
                          "of seconds >= 0 (0 = no budget: train.max_steps steps)")
    if not (math.isfinite(cfg.train.muon_lr) and cfg.train.muon_lr > 0):
        raise ConfigError(f"{where}: 'train.muon_lr' = {cfg.train.muon_lr}; it must be a finite number > 0 "
                          "(0.02 is usual)")
    if not 0 < cfg.train.muon_momentum < 1:
        raise ConfigError(f"{where}: 'train.muon_momentum' = {cfg.train.muon_momentum}; it must lie in (0, 1) "
                          "(0.95 is usual)")
    if cfg.train.optimizer == "muon" and cfg.parallel.zero_stage != 3:
        raise ConfigError(f"{where}: 'train.optimizer' = muon needs 'parallel.zero_stage' = 3 (got "
                          f"{cfg.parallel.zero_stage}): the trainer clips the gradient before DeepSpeed's ZeRO-3 "
                          "Muon step; stages 0-2 cannot (use train.optimizer=adamw there)")
    if cfg.train.global_batch_size % cfg.train.micro_batch_size:
        raise ConfigError(
            f"{where}: 'train.global_batch_size' must be a multiple of 'train.micro_batch_size'"
        )
    if cfg.parallel.zero_stage not in (0, 1, 2, 3):
        raise ConfigError(f"{where}: 'parallel.zero_stage' = {cfg.parallel.zero_stage}; allowed values: 0, 1, 2, 3")


def parse_override(text: str) -> tuple[list[str], Any]:
    """``'train.lr=3e-4'`` -> (['train', 'lr'], 3e-4); the value is parsed as YAML."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like key.sub=value (e.g. train.lr=3e-4)")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"override {text!r} has an empty key")
    value = yaml.safe_load(raw) if raw.strip() else ""
    return key.split("."), value


def _apply_override(tree: dict, path: list[str], value: Any, where: str) -> None:
    node, cls = tree, Config
    for i, part in enumerate(path):
        names = [f.name for f in dataclasses.fields(cls)]
        if part not in names:
            prefix = ".".join(path[:i]) or "the top level"
            raise ConfigError(
                f"{where}: unknown key '{'.'.join(path[: i + 1])}'; allowed keys in '{prefix}': "
                + ", ".join(names)
            )
        tp = typing.get_type_hints(cls)[part]
        if i == len(path) - 1:
            node[part] = value
            return
        if not dataclasses.is_dataclass(tp):
            raise ConfigError(f"{where}: '{'.'.join(path[: i + 1])}' is a value, not a section")
        if node.get(part) is None:
            node[part] = {}
        node = node[part]
        cls = tp


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Load ``path`` (YAML; ``None`` for the defaults), apply dotted ``overrides``, validate."""
    where = str(path) if path is not None else "<defaults>"
    tree: dict = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {where} does not exist; the configs/ folder holds the shipped ones")
        with open(p) as f:
            try:
                tree = yaml.safe_load(f) or {}
            except yaml.YAMLError as e:
                raise ConfigError(f"{where}: not valid YAML: {e}") from e
        if not isinstance(tree, dict):
            raise ConfigError(f"{where}: the top level must be a mapping of sections")
    for text in overrides:
        keys, value = parse_override(text)
        _apply_override(tree, keys, value, f"{where} (override --set {text})")
    cfg = _build(Config, tree, "", where)
    _check(cfg, where)
    return cfg


def config_from_dict(tree: dict, where: str = "<dict>") -> Config:
    """Validate an already-parsed config tree (e.g. one stored in a checkpoint)."""
    cfg = _build(Config, tree, "", where)
    _check(cfg, where)
    return cfg


def dump_config(cfg: Config, path: str | Path) -> None:
    with open(path, "w") as f:
        yaml.safe_dump(cfg.to_dict(), f, sort_keys=False)
