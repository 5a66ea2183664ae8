"""MDMBackbone: the Mamba-2 diffusion backbone over the joint text + image latent sequence.

Sequence (docs/model.md): ``[time_txt][time_img][category][text ...][sep][image ...][pad ...]``,
every element projected to ``d_model``:

- time tokens: sinusoidal embedding of ``t`` through a 2-layer MLP, one per modality, since the
  two modalities carry independent noise levels (t = 0: the modality is given as a condition);
- category token: a learned embedding of ``num_categories + 1`` entries (the last one is the
  null class of classifier-free guidance);
- text / image latents (width ``d_z``): a linear projection plus a learned position embedding;
  with ``self_condition`` the image tokens also add a zero-initialized projection of an estimate
  of the clean image latents (``img_sc``: the model's own earlier prediction, or zeros); with
  ``image_mask_prob`` > 0, image tokens marked hidden by ``img_keep`` (training only) take a
  learned mask embedding in place of their latent's projection (MDT's masked latent modelling);
- sep, lateral row pads (optional, DiM) and tail pads: learned tokens.

``n_layers`` pre-norm residual Mamba blocks, each a *scan switch*: the block's mixers scan the
sequence in their directions (``scan_mode: multi`` = every direction in every block, the paper's
reading; ``cycle`` = block i scans direction i mod n, DiM's) and the outputs, brought back to the
original token order, are averaged (or summed). Optional U-ViT long skips and interleaved
attention blocks (``attention_every``). Two zero-initialized output heads map back to ``d_z``:
the text head's output is decoded by the VAE's text decoder into vocabulary log-scores, the image
head's output is the epsilon prediction of the image latents.

The module knows nothing of DeepSpeed or process groups (mdm_dist/parallel wraps it).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from mdm_dist.config import ModelConfig, VAEConfig, block_kinds
from mdm_dist.models.attention import AttentionBlock
from mdm_dist.models.mamba2 import Mamba2Mixer, mixers_forward_stacked
from mdm_dist.models.scan import NUM_PREFIX, SequenceLayout, scan_orders


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of t in [0, 1] (scaled by 1000, as discrete-step models see it)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = (t.float() * 1000.0)[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


class TimeEmbedding(nn.Module):
    def __init__(self, d_model: int, device=None, dtype=None):
        super().__init__()
        self.d_model = d_model
        self.mlp = nn.Sequential(
            nn.Linear(d_model, d_model, device=device, dtype=dtype),
            nn.SiLU(),
            nn.Linear(d_model, d_model, device=device, dtype=dtype),
        )

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        emb = timestep_embedding(t, self.d_model).to(self.mlp[0].weight.dtype)
        return self.mlp(emb)


class MambaBlock(nn.Module):
    """Pre-norm residual scan-switch block: ``x + combine_k unpermute_k(mixer_k(permute_k(norm x)))``.

    ``directions`` names the scan directions of this block; with ``share_weights`` one mixer serves
    them all, else each direction has its own mixer (the paper's 7B reading).

    ``stack_directions`` (default on): when the mixers run on the Triton path, all directions go
    through :func:`mixers_forward_stacked` (one conv launch and one scan launch for the K
    directions, each ordering its reads and writes inside the kernels) instead of one mixer call
    per direction; the result is the same. It falls back to the per-direction loop where a mixer's
    ``forward`` is replaced (the sequence-parallel subclass) or its parameters are partitioned by
    ZeRO-3 (each mixer is a ZeRO-3 leaf module whose parameters are gathered by its own forward).
    """

    def __init__(self, cfg: ModelConfig, directions: list[str], device=None, dtype=None,
                 stack_directions: bool = True):
        super().__init__()
        self.directions = list(directions)
        self.combine = cfg.direction_combine
        self.stack_directions = stack_directions
        self.norm = nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps, device=device, dtype=dtype)
        # adaLN (model.adaln): shift, scale of the normed input and the branch's gate, from cond
        self.ada = nn.Linear(cfg.d_model, 3 * cfg.d_model, device=device, dtype=dtype) if cfg.adaln else None
        n_mixers = 1 if cfg.share_direction_weights else len(directions)
        self.mixers = nn.ModuleList(
            [Mamba2Mixer.from_config(cfg, device=device, dtype=dtype) for _ in range(n_mixers)]
        )

    def reset_parameters(self) -> None:
        if self.ada is not None:  # zero: the block starts as without adaLN
            nn.init.zeros_(self.ada.weight)
            nn.init.zeros_(self.ada.bias)

    def forward(self, x: torch.Tensor, orders: dict[str, torch.Tensor],
                cond: torch.Tensor | None = None) -> torch.Tensor:
        h = self.norm(x)
        gate = None
        if self.ada is not None:
            if cond is None:
                raise ValueError("a MambaBlock built with model.adaln needs cond (B, d_model)")
            shift, scale, gate = self.ada(F.silu(cond)).unsqueeze(1).chunk(3, dim=-1)
            h = h * (1 + scale) + shift
        elif cond is not None:
            raise ValueError("cond given to a MambaBlock built without model.adaln")
        backend = self._stacked_backend(h)
        if backend is not None:
            out = mixers_forward_stacked(self.mixers, h, [orders[name] for name in self.directions],
                                         backend=backend)
        else:
            out = None
            for i, name in enumerate(self.directions):
                mixer = self.mixers[i if len(self.mixers) > 1 else 0]
                y = mixer(h, scan_order=orders[name])
                out = y if out is None else out + y
        if self.combine == "mean" and len(self.directions) > 1:
            out = out / len(self.directions)
        return x + (out if gate is None else (1 + gate) * out)

    def _stacked_backend(self, h: torch.Tensor) -> str | None:
        """``triton`` when the directions can run stacked (see the class docstring), else None."""
        if not self.stack_directions or len(self.directions) < 2:
            return None
        if any(type(m).forward is not Mamba2Mixer.forward for m in self.mixers):
            return None  # a subclass (sequence parallelism) computes its own way
        if any(hasattr(p, "ds_id") for p in self.mixers.parameters()):
            return None  # ZeRO-3 partitions: only the mixer's own forward gathers them
        backends = {m.resolve_backend(h) for m in self.mixers}
        return "triton" if backends == {"triton"} else None


class MDMBackbone(nn.Module):
    def __init__(self, cfg: ModelConfig, vae_cfg: VAEConfig, device=None, dtype=None):
        super().__init__()
        self.cfg = cfg
        down = 2 ** (len(vae_cfg.channel_mult) - 1) * vae_cfg.patch_size
        grid = vae_cfg.image_size // down
        self.layout = SequenceLayout(
            text_len=vae_cfg.max_text_len, grid_h=grid, grid_w=grid,
            lateral_pad=cfg.lateral_pad, num_tail_pad=cfg.num_tail_pad,
        )
        d, d_z = cfg.d_model, vae_cfg.d_z
        kw = dict(device=device, dtype=dtype)
        self.time_txt = TimeEmbedding(d, **kw)
        self.time_img = TimeEmbedding(d, **kw)
        self.category = nn.Embedding(cfg.num_categories + 1, d, **kw)
        self.txt_in = nn.Linear(d_z, d, **kw)
        self.img_in = nn.Linear(d_z, d, **kw)
        self.img_sc_in = nn.Linear(d_z, d, **kw) if cfg.self_condition else None
        self.img_mask = nn.Parameter(torch.empty(d, **kw)) if cfg.image_mask_prob > 0 else None
        self.txt_pos = nn.Parameter(torch.empty(self.layout.text_len, d, **kw))
        self.img_pos = nn.Parameter(torch.empty(grid * grid, d, **kw))
        self.sep = nn.Parameter(torch.empty(d, **kw))
        self.row_pad = nn.Parameter(torch.empty(grid, d, **kw)) if cfg.lateral_pad else None
        self.tail_pad = nn.Parameter(torch.empty(cfg.num_tail_pad, d, **kw)) if cfg.num_tail_pad else None

        dirs = list(cfg.image_directions)
        self.layer_kinds = block_kinds(cfg)
        layers: list[nn.Module] = []
        n_mamba = 0
        for kind in self.layer_kinds:
            if kind == "attn":
                layers.append(AttentionBlock(d, cfg.attn_heads, eps=cfg.norm_eps, adaln=cfg.adaln, **kw))
                continue
            block_dirs = dirs if cfg.scan_mode == "multi" else [dirs[n_mamba % len(dirs)]]
            layers.append(MambaBlock(cfg, block_dirs, **kw))
            n_mamba += 1
        self.layers = nn.ModuleList(layers)
        # U-ViT long skips: the output of Mamba block i (first half) feeds block n-1-i (second half).
        n_skip = cfg.n_layers // 2 if cfg.long_skip else 0
        self.skip_proj = nn.ModuleList([nn.Linear(2 * d, d, **kw) for _ in range(n_skip)])
        self.norm_out = nn.RMSNorm(d, eps=cfg.norm_eps, **kw)
        self.txt_out = nn.Linear(d, d_z, **kw)
        self.img_out = nn.Linear(d, d_z, **kw)
        # adaLN's pooled caption: a per-token MLP of the text latents (plus their positions),
        # averaged over the text tokens (SD3's pooled text embedding, from our own latents)
        if cfg.adaln:
            self.txt_pool_in = nn.Linear(d_z, d, **kw)
            self.txt_pool_out = nn.Linear(d, d, **kw)
        else:
            self.txt_pool_in = self.txt_pool_out = None
        # the projector of representation alignment (REPA's MLP: d -> 2d -> d, SiLU)
        self.align_proj = nn.Sequential(
            nn.Linear(d, 2 * d, **kw), nn.SiLU(), nn.Linear(2 * d, d, **kw),
        ) if cfg.repr_align_weight > 0 else None
        self._orders: dict[torch.device, dict[str, torch.Tensor]] = {}

    # ------------------------------------------------------------------------------------------
    def reset_parameters(self) -> None:
        std = self.cfg.init_std
        for p in (self.txt_pos, self.img_pos, self.sep, self.row_pad, self.tail_pad, self.img_mask):
            if p is not None:
                nn.init.normal_(p, std=std)
        nn.init.normal_(self.category.weight, std=std)
        for head in (self.txt_out, self.img_out):  # zero output: the untrained model predicts 0
            nn.init.zeros_(head.weight)
            nn.init.zeros_(head.bias)
        if self.img_sc_in is not None:  # self-conditioning starts as a no-op
            nn.init.zeros_(self.img_sc_in.weight)
            nn.init.zeros_(self.img_sc_in.bias)

    def scan_orders(self, device: torch.device) -> dict[str, torch.Tensor]:
        """Permutations per direction name, built once per device (not buffers: meta-safe)."""
        if device not in self._orders:
            names = list(self.cfg.image_directions)
            orders = scan_orders(self.layout, names).to(device)
            self._orders[device] = {n: orders[i] for i, n in enumerate(names)}
        return self._orders[device]

    def embed(self, txt, img, t_txt, t_img, category, img_sc=None, img_keep=None) -> torch.Tensor:
        """Assemble the ``(B, T, d_model)`` input sequence."""
        b = txt.shape[0]
        lay = self.layout
        dtype = self.txt_in.weight.dtype
        parts = [
            self.time_txt(t_txt).unsqueeze(1),
            self.time_img(t_img).unsqueeze(1),
            self.category(category).unsqueeze(1),
            self.txt_in(txt.to(dtype)) + self.txt_pos[: txt.shape[1]],
            self.sep.expand(b, 1, -1),
        ]
        x_img = self.img_in(img.to(dtype))
        if self.img_mask is not None:  # always applied (all kept without img_keep): one graph for ZeRO
            keep = torch.ones(img.shape[:2], dtype=torch.bool, device=img.device) if img_keep is None else img_keep
            x_img = torch.where(keep.to(img.device)[..., None], x_img, self.img_mask.to(x_img.dtype))
        elif img_keep is not None:
            raise ValueError("img_keep given to a backbone built without model.image_mask_prob > 0")
        x_img = x_img + self.img_pos
        if self.img_sc_in is not None:  # always applied (zeros without an estimate): one graph for ZeRO
            x_img = x_img + self.img_sc_in((torch.zeros_like(img) if img_sc is None else img_sc).to(dtype))
        elif img_sc is not None:
            raise ValueError("img_sc given to a backbone built without model.self_condition")
        if self.row_pad is not None:
            g = lay.grid_h
            x_img = torch.cat([x_img.view(b, g, lay.grid_w, -1), self.row_pad.expand(b, g, -1).unsqueeze(2)], dim=2)
            x_img = x_img.reshape(b, lay.num_image_slots, -1)
        parts.append(x_img)
        if self.tail_pad is not None:
            parts.append(self.tail_pad.expand(b, -1, -1))
        return torch.cat(parts, dim=1)

    def forward(self, txt: torch.Tensor, img: torch.Tensor, t_txt: torch.Tensor, t_img: torch.Tensor,
                category: torch.Tensor, img_sc: torch.Tensor | None = None,
                img_keep: torch.Tensor | None = None, hidden_at: tuple[int, ...] = ()):
        """Denoise the joint sequence. Shapes: docs/model.md; ``img_sc`` (like ``img``) the clean
        image estimate of self-conditioning (None: zeros); ``img_keep`` (B, N) bool, False where
        an image token is hidden behind the mask embedding (None: all visible).
        Returns ``(txt_out, img_out)``; with ``hidden_at`` (indices into ``self.layers``) also a
        dict ``{i: (B, N, d_model)}`` of the image tokens' states after layer i (the whole
        sequence's, also under sequence parallelism)."""
        lay = self.layout
        if txt.shape[1] != lay.text_len or img.shape[1] != lay.grid_h * lay.grid_w:
            raise ValueError(
                f"expected {lay.text_len} text and {lay.grid_h * lay.grid_w} image latents "
                f"(vae.max_text_len, vae.image_size), got {txt.shape[1]} and {img.shape[1]}"
            )
        x = self.embed(txt, img, t_txt, t_img, category, img_sc, img_keep)
        cond = self.condition(txt, t_txt, t_img, category) if self.cfg.adaln else None
        kw = {} if cond is None else {"cond": cond}
        orders = self.scan_orders(x.device)
        skips: list[torch.Tensor] = []
        n_skip = len(self.skip_proj)
        for i in hidden_at:
            if not 0 <= i < len(self.layers):
                raise ValueError(f"hidden_at: layer {i} does not exist; allowed: 0 .. {len(self.layers) - 1}")
        hidden: dict[int, torch.Tensor] = {}
        img_pos = lay.image_positions().to(x.device)
        mamba_idx = 0
        for li, (kind, layer) in enumerate(zip(self.layer_kinds, self.layers)):
            if kind == "attn":
                x = layer(x, **kw)
            else:
                late = mamba_idx - (self.cfg.n_layers - n_skip)  # >= 0 in the second half
                if n_skip and late >= 0:
                    x = self.skip_proj[late](torch.cat([x, skips.pop()], dim=-1))
                x = layer(x, orders, **kw)
                if mamba_idx < n_skip:
                    skips.append(x)
                mamba_idx += 1
            if li in hidden_at:
                hidden[li] = self.whole_sequence(x)[:, img_pos]
        x = self.norm_out(x)
        txt_out = self.txt_out(x[:, lay.text_start: lay.text_start + lay.text_len])
        img_out = self.img_out(x[:, img_pos])
        if hidden_at:
            return txt_out, img_out, hidden
        return txt_out, img_out

    def condition(self, txt: torch.Tensor, t_txt: torch.Tensor, t_img: torch.Tensor,
                  category: torch.Tensor) -> torch.Tensor:
        """adaLN's per-sample conditioning vector (B, d_model): both time embeddings, the category
        embedding and the pooled caption (``model.adaln``)."""
        dtype = self.txt_pool_in.weight.dtype
        h = F.silu(self.txt_pool_in(txt.to(dtype)) + self.txt_pos[: txt.shape[1]])
        pooled = self.txt_pool_out(h).mean(dim=1)
        return self.time_txt(t_txt) + self.time_img(t_img) + self.category(category) + pooled

    def whole_sequence(self, x: torch.Tensor) -> torch.Tensor:
        """The whole ``(B, T, d)`` sequence of a state between layers (this rank's slice of it
        under sequence parallelism, which overrides this with a gather)."""
        return x


__all__ = ["MDMBackbone", "MambaBlock", "TimeEmbedding", "timestep_embedding", "NUM_PREFIX"]
