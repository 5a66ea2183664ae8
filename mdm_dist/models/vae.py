"""UnifiedVAE: one latent space for image patches and text tokens.

The paper's unified VAE maps image patches and text tokens into one shared per-token latent
space, ``z = mu + sigma * eps`` of width ``d_z``, and decodes latents back to pixels or to
vocabulary logits. This module is the project's reading of it (``shared/MDM_SPEC.md`` sec. 1,
``docs/model.md``)::

    image (B, C, H, W) --conv encoder--> (B, latent_channels, h', w') --patchify p-->
        (B, N, latent_channels * p * p) --image_in--> (B, N, trunk_width) ---+
                                                                             +-- + modality_emb[m]
    ids (B, L) --tok_emb + pos_emb--> (B, L, trunk_width) -------------------+
                                                                             |
         shared encoder trunk (residual MLP per token) --> moments --> (mu, logvar), (B, T, d_z)

    z (B, T, d_z) --z_in + modality_emb[m]--> shared decoder trunk --> (B, T, trunk_width)
        image: --image_out--> (B, N, latent_channels * p * p) --unpatchify--> conv decoder
               --> x_hat (B, C, H, W)
        text:  --text_head--> logits (B, L, vocab_size)

Choices where the paper is silent, and why:

* **Conv stem.** SD-VAE-like: ``conv_in`` to ``base_channels``, one stage of
  ``num_res_blocks`` GroupNorm+SiLU residual blocks per ``channel_mult`` entry, a stride-2 conv
  between stages (downsample ``2 ** (len(channel_mult) - 1)``), then ``conv_out`` to
  ``latent_channels``. SD-VAE's mid-block self-attention is left out: the latent grid is small,
  and the per-token trunk plus the backbone supply the global mixing. The decoder mirrors it
  with nearest-neighbour 2x upsampling + conv, and has no output activation (pixels are in
  [-1, 1]; the L2 loss handles the range, and a tanh would flatten gradients at saturated pixels).
* **GroupNorm groups** = ``gcd(channels, 32)``: SD-VAE's 32 groups where the width allows it,
  fewer for the small widths of CPU configs.
* **Tokens.** The conv latent grid is patchified row-major over the token grid ``(gh, gw)``;
  inside a token the features are ordered ``(channel, row-in-patch, col-in-patch)``, i.e.
  ``b c (gh p1) (gw p2) -> b (gh gw) (c p1 p2)``.
* **Shared trunk.** The same pre-norm residual MLPs serve both modalities; a learned modality
  embedding (``2 x trunk_width``, index 0 = image, 1 = text; one table used by the encoder and
  the decoder trunk) is added to the trunk input so the trunk knows which stem it serves. The
  trunk is per token: image tokens need no position embedding (the conv receptive field and the
  backbone's scan order carry position); text tokens get a learned position embedding over
  ``max_text_len`` on the way in, and the text decoder is position-free (the latent carries it).
* **logvar** is clamped to ``[logvar_min, logvar_max]`` so ``exp(logvar)`` cannot overflow.
* **Loss** (computed in float32 whatever the parameter dtype): ``rec_img`` = pixel MSE,
  ``rec_txt`` = token cross entropy (PAD included: PAD is a real token the model must generate),
  ``kl`` = mean over all present tokens (image and text together) of the per-token KL summed
  over ``d_z``; ``total = rec_img + rec_txt + beta_kl * kl``.

* **Latent normalization.** :meth:`encode_image` returns the image latents standardized per
  latent dimension, ``(mu - image_latent_shift) / image_latent_scale`` (logvar shifted by
  ``-2 log scale``), and :meth:`decode_image` undoes it first; the two buffers (``d_z`` each)
  are the mean and std of the training set's image latents, measured by ``launch/train_vae.py``
  after training (:meth:`set_image_latent_stats`) and saved with the weights. The diffusion
  backbone thus sees image latents of unit variance in every dimension, the data scale its
  noise schedules assume (SD-VAE's scale factor and EDM's sigma_data play this role): unscaled,
  the demo VAE's latents had per-dimension stds of 0.8-2.1, so the noisy end of the schedule,
  where the caption decides colour and shape, was compressed. The VAE's own loss works on the
  raw moments (its KL is the one it was trained with); until the stats are set the buffers are
  the identity. Text latents are not rescaled.

Meta-device construction: every layer takes ``device``/``dtype``, so ``UnifiedVAE(cfg,
device="meta")`` allocates nothing; ``.to_empty(device=...)`` then :meth:`reset_parameters`
materializes and initializes every parameter.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from mdm_dist.config import VAEConfig

IMAGE, TEXT = 0, 1  # rows of the modality embedding


def _groups(channels: int) -> int:
    """GroupNorm group count: SD-VAE's 32 when it divides ``channels``, else the largest power of
    two that does (gcd with 32), so small CPU widths (e.g. 12, 16, 24) still normalize."""
    return math.gcd(channels, 32)


# ----------------------------------------------------------------------------------------------
# Conv stem
# ----------------------------------------------------------------------------------------------


class ResBlock(nn.Module):
    """GroupNorm -> SiLU -> conv3x3, twice, plus a (1x1 if the width changes) skip."""

    def __init__(self, c_in: int, c_out: int, **fk) -> None:
        super().__init__()
        self.norm1 = nn.GroupNorm(_groups(c_in), c_in, eps=1e-6, **fk)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1, **fk)
        self.norm2 = nn.GroupNorm(_groups(c_out), c_out, eps=1e-6, **fk)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, **fk)
        self.skip = nn.Conv2d(c_in, c_out, 1, **fk) if c_in != c_out else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return self.skip(x) + h


class Downsample(nn.Module):
    """Stride-2 3x3 conv: halves H and W (inputs have even sizes by the config check)."""

    def __init__(self, c: int, **fk) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, stride=2, padding=1, **fk)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class Upsample(nn.Module):
    """Nearest-neighbour 2x upsampling followed by a 3x3 conv (no checkerboard artifacts)."""

    def __init__(self, c: int, **fk) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1, **fk)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class ConvEncoder(nn.Module):
    """(B, in_channels, H, W) -> (B, latent_channels, H / 2**(S-1), W / 2**(S-1)), S stages."""

    def __init__(self, cfg: VAEConfig, **fk) -> None:
        super().__init__()
        widths = [cfg.base_channels * m for m in cfg.channel_mult]
        self.conv_in = nn.Conv2d(cfg.in_channels, cfg.base_channels, 3, padding=1, **fk)
        layers: list[nn.Module] = []
        c = cfg.base_channels
        for i, w in enumerate(widths):
            for _ in range(cfg.num_res_blocks):
                layers.append(ResBlock(c, w, **fk))
                c = w
            if i < len(widths) - 1:
                layers.append(Downsample(c, **fk))
        self.stages = nn.Sequential(*layers)
        self.norm_out = nn.GroupNorm(_groups(c), c, eps=1e-6, **fk)
        self.conv_out = nn.Conv2d(c, cfg.latent_channels, 3, padding=1, **fk)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.stages(self.conv_in(x))
        return self.conv_out(F.silu(self.norm_out(h)))


class ConvDecoder(nn.Module):
    """Mirror of :class:`ConvEncoder`: (B, latent_channels, h', w') -> (B, in_channels, H, W)."""

    def __init__(self, cfg: VAEConfig, **fk) -> None:
        super().__init__()
        widths = [cfg.base_channels * m for m in cfg.channel_mult]
        c = widths[-1]
        self.conv_in = nn.Conv2d(cfg.latent_channels, c, 3, padding=1, **fk)
        layers: list[nn.Module] = []
        for i in reversed(range(len(widths))):
            for _ in range(cfg.num_res_blocks):
                layers.append(ResBlock(c, widths[i], **fk))
                c = widths[i]
            if i > 0:
                layers.append(Upsample(c, **fk))
        self.stages = nn.Sequential(*layers)
        self.norm_out = nn.GroupNorm(_groups(c), c, eps=1e-6, **fk)
        self.conv_out = nn.Conv2d(c, cfg.in_channels, 3, padding=1, **fk)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        h = self.stages(self.conv_in(h))
        return self.conv_out(F.silu(self.norm_out(h)))  # no output activation: see module doc


# ----------------------------------------------------------------------------------------------
# Shared per-token trunk
# ----------------------------------------------------------------------------------------------


class ResidualMLP(nn.Module):
    """Pre-norm residual MLP on the last dim: ``x + W2 silu(W1 LN(x))``, width ``width``."""

    def __init__(self, width: int, **fk) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(width, **fk)
        self.fc1 = nn.Linear(width, width, **fk)
        self.fc2 = nn.Linear(width, width, **fk)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.fc2(F.silu(self.fc1(self.norm(x))))


class TrunkEncoder(nn.Module):
    """(..., trunk_width) -> (mu, logvar), each (..., d_z); logvar clamped."""

    def __init__(self, cfg: VAEConfig, **fk) -> None:
        super().__init__()
        self.layers = nn.ModuleList(ResidualMLP(cfg.trunk_width, **fk) for _ in range(cfg.trunk_layers))
        self.norm_out = nn.LayerNorm(cfg.trunk_width, **fk)
        self.moments = nn.Linear(cfg.trunk_width, 2 * cfg.d_z, **fk)
        self.logvar_min, self.logvar_max = cfg.logvar_min, cfg.logvar_max

    def forward(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        for layer in self.layers:
            h = layer(h)
        mu, logvar = self.moments(self.norm_out(h)).chunk(2, dim=-1)
        return mu, logvar.clamp(self.logvar_min, self.logvar_max)


class TrunkDecoder(nn.Module):
    """(..., d_z) + modality embedding -> (..., trunk_width), same residual shape as the encoder."""

    def __init__(self, cfg: VAEConfig, **fk) -> None:
        super().__init__()
        self.z_in = nn.Linear(cfg.d_z, cfg.trunk_width, **fk)
        self.layers = nn.ModuleList(ResidualMLP(cfg.trunk_width, **fk) for _ in range(cfg.trunk_layers))
        self.norm_out = nn.LayerNorm(cfg.trunk_width, **fk)

    def forward(self, z: torch.Tensor, modality: torch.Tensor) -> torch.Tensor:
        h = self.z_in(z) + modality
        for layer in self.layers:
            h = layer(h)
        return self.norm_out(h)


# ----------------------------------------------------------------------------------------------
# The VAE
# ----------------------------------------------------------------------------------------------


class UnifiedVAE(nn.Module):
    """Image + text VAE with one shared per-token latent space of width ``cfg.d_z``.

    Submodules (the names matter: :meth:`freeze_image_encoder` and checkpoints use them):
    ``image_encoder`` (conv stem) and ``image_in`` (patch projection) form the image encoder
    path; ``image_out`` and ``image_decoder`` the image decoder path; ``tok_emb``/``pos_emb``
    the text stem and ``text_head`` the text decoder head; ``modality_emb``, ``trunk_enc`` and
    ``trunk_dec`` are shared by both modalities.
    """

    def __init__(self, cfg: VAEConfig, device=None, dtype=None) -> None:
        super().__init__()
        down = 2 ** (len(cfg.channel_mult) - 1)
        if cfg.image_size % (down * cfg.patch_size):
            raise ValueError(
                f"vae.image_size = {cfg.image_size} must be divisible by the downsample ({down}) "
                f"times vae.patch_size ({cfg.patch_size})"
            )
        fk = {"device": device, "dtype": dtype}
        self.cfg = cfg
        self.downsample = down
        p, w = cfg.patch_size, cfg.trunk_width
        token_dim = cfg.latent_channels * p * p
        # image stem
        self.image_encoder = ConvEncoder(cfg, **fk)
        self.image_in = nn.Linear(token_dim, w, **fk)
        self.image_out = nn.Linear(w, token_dim, **fk)
        self.image_decoder = ConvDecoder(cfg, **fk)
        # text stem
        self.tok_emb = nn.Embedding(cfg.vocab_size, w, **fk)
        self.pos_emb = nn.Parameter(torch.empty(cfg.max_text_len, w, **fk))
        self.text_head = nn.Linear(w, cfg.vocab_size, **fk)
        # shared trunk
        self.modality_emb = nn.Parameter(torch.empty(2, w, **fk))
        self.trunk_enc = TrunkEncoder(cfg, **fk)
        self.trunk_dec = TrunkDecoder(cfg, **fk)
        # diffusion-space standardization of the image latents (module docstring); persistent,
        # so checkpoints and exports carry it; identity until set_image_latent_stats
        self.register_buffer("image_latent_shift", torch.zeros(cfg.d_z, **fk))
        self.register_buffer("image_latent_scale", torch.ones(cfg.d_z, **fk))
        self.reset_parameters()

    # -- initialization ----------------------------------------------------------------------

    def reset_parameters(self) -> None:
        """(Re)initialize every parameter: PyTorch's default init for the conv, linear and norm
        layers (kaiming-uniform weights, unit norm gains), N(0, 0.02) for the embeddings. Works
        on any device, including after ``to_empty`` from a meta-built model."""
        for m in self.modules():
            if m is not self and isinstance(
                m, (nn.Conv2d, nn.Linear, nn.GroupNorm, nn.LayerNorm, nn.Embedding)
            ):
                m.reset_parameters()
        with torch.no_grad():
            nn.init.normal_(self.tok_emb.weight, std=0.02)
            nn.init.normal_(self.pos_emb, std=0.02)
            nn.init.normal_(self.modality_emb, std=0.02)
            self.image_latent_shift.zero_()  # also after to_empty: buffers come uninitialized
            self.image_latent_scale.fill_(1.0)

    # -- image tokens ------------------------------------------------------------------------

    @property
    def grid(self) -> tuple[int, int]:
        """Token grid ``(gh, gw)`` at ``cfg.image_size``."""
        g = self.cfg.image_size // (self.downsample * self.cfg.patch_size)
        return g, g

    @property
    def num_image_tokens(self) -> int:
        gh, gw = self.grid
        return gh * gw

    def patchify(self, h: torch.Tensor) -> torch.Tensor:
        """(B, C, gh*p, gw*p) -> (B, gh*gw, C*p*p): tokens row-major, features (c, p1, p2)."""
        b, c, hh, ww = h.shape
        p = self.cfg.patch_size
        if hh % p or ww % p:
            raise ValueError(f"latent grid {hh}x{ww} is not divisible by patch_size {p}")
        gh, gw = hh // p, ww // p
        h = h.reshape(b, c, gh, p, gw, p).permute(0, 2, 4, 1, 3, 5)
        return h.reshape(b, gh * gw, c * p * p)

    def unpatchify(self, tokens: torch.Tensor, grid: tuple[int, int] | None = None) -> torch.Tensor:
        """Inverse of :meth:`patchify`: (B, gh*gw, C*p*p) -> (B, C, gh*p, gw*p)."""
        gh, gw = grid if grid is not None else self.grid
        b, n, d = tokens.shape
        p = self.cfg.patch_size
        c = d // (p * p)
        if n != gh * gw or c * p * p != d:
            raise ValueError(
                f"cannot unpatchify tokens of shape {tuple(tokens.shape)} onto grid {gh}x{gw} "
                f"with patch_size {p}; pass grid= for images not at vae.image_size"
            )
        x = tokens.reshape(b, gh, gw, c, p, p).permute(0, 3, 1, 4, 2, 5)
        return x.reshape(b, c, gh * p, gw * p)

    def encode_image(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Pixels (B, C, H, W) in [-1, 1] -> (mu, logvar), each (B, N, d_z), N = gh * gw tokens
        row-major over the token grid, standardized for diffusion (module docstring: latent
        normalization). H and W must be multiples of downsample * patch_size (``cfg.image_size``
        gives N = :attr:`num_image_tokens`). Pixels are cast to the parameter dtype, so float32
        data can feed a bf16 model."""
        mu, logvar = self.encode_image_raw(x)
        scale = self.image_latent_scale.to(mu.dtype)
        return (mu - self.image_latent_shift.to(mu.dtype)) / scale, logvar - 2.0 * torch.log(scale)

    def decode_image(self, z: torch.Tensor, grid: tuple[int, int] | None = None) -> torch.Tensor:
        """Standardized latents (B, N, d_z), as :meth:`encode_image` returns them -> pixels
        (B, C, H, W), unbounded (trained toward [-1, 1]). ``grid`` defaults to :attr:`grid`;
        pass it for other resolutions."""
        z = z * self.image_latent_scale.to(z.dtype) + self.image_latent_shift.to(z.dtype)
        return self.decode_image_raw(z, grid)

    def encode_image_raw(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`encode_image` before the standardization: the trunk's own posterior moments."""
        x = x.to(self.image_in.weight.dtype)
        tokens = self.patchify(self.image_encoder(x))
        h = self.image_in(tokens) + self.modality_emb[IMAGE]
        return self.trunk_enc(h)

    def decode_image_raw(self, z: torch.Tensor, grid: tuple[int, int] | None = None) -> torch.Tensor:
        """:meth:`decode_image` of raw (trunk-space, unstandardized) latents."""
        h = self.trunk_dec(z, self.modality_emb[IMAGE])
        return self.image_decoder(self.unpatchify(self.image_out(h), grid))

    @torch.no_grad()
    def set_image_latent_stats(self, raw_mu: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Set the standardization from raw image latent means ``raw_mu`` (..., d_z) of training
        images (:meth:`encode_image_raw`): per-dimension mean and std over every token. A
        dimension with std below 1e-6 keeps scale 1. Returns (shift, scale)."""
        flat = raw_mu.detach().reshape(-1, self.cfg.d_z).double()
        if flat.shape[0] < 2:
            raise ValueError(f"set_image_latent_stats needs at least 2 latent tokens, got {flat.shape[0]}")
        shift, scale = flat.mean(0), flat.std(0)
        scale = torch.where(scale > 1e-6, scale, torch.ones_like(scale))
        self.image_latent_shift.copy_(shift.to(self.image_latent_shift.dtype))
        self.image_latent_scale.copy_(scale.to(self.image_latent_scale.dtype))
        return self.image_latent_shift.clone(), self.image_latent_scale.clone()

    # -- text tokens -------------------------------------------------------------------------

    def encode_text(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Token ids (B, L), L <= max_text_len -> (mu, logvar), each (B, L, d_z)."""
        L = ids.shape[1]
        if L > self.cfg.max_text_len:
            raise ValueError(f"text length {L} exceeds vae.max_text_len = {self.cfg.max_text_len}")
        h = self.tok_emb(ids) + self.pos_emb[:L] + self.modality_emb[TEXT]
        return self.trunk_enc(h)

    def decode_text(self, z: torch.Tensor) -> torch.Tensor:
        """Latents (B, L, d_z) -> vocabulary logits (B, L, vocab_size)."""
        return self.text_head(self.trunk_dec(z, self.modality_emb[TEXT]))

    # -- Gaussian posterior ------------------------------------------------------------------

    @staticmethod
    def kl(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
        """Per-token KL(N(mu, exp(logvar)) || N(0, I)) summed over d_z: (B, T, d_z) -> (B, T).

        0.5 * sum(mu^2 + exp(logvar) - 1 - logvar), computed in at least float32."""
        dt = torch.promote_types(mu.dtype, torch.float32)
        mu, logvar = mu.to(dt), logvar.to(dt)
        return 0.5 * (mu.square() + logvar.exp() - 1.0 - logvar).sum(dim=-1)

    @staticmethod
    def sample(
        mu: torch.Tensor, logvar: torch.Tensor, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """Reparameterized sample z = mu + exp(logvar / 2) * eps, eps ~ N(0, I) drawn with
        ``generator`` (which must live on mu's device) for reproducibility."""
        eps = torch.randn(mu.shape, generator=generator, device=mu.device, dtype=mu.dtype)
        return mu + torch.exp(0.5 * logvar) * eps

    # -- training ----------------------------------------------------------------------------

    def loss(
        self,
        images: torch.Tensor | None = None,
        ids: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> dict[str, torch.Tensor]:
        """VAE-stage loss on whatever modalities are given (at least one).

        Returns float32 scalars: ``rec_img`` (pixel MSE) and ``psnr`` (dB, peak-to-peak 2, no
        grad) when ``images`` is given; ``rec_txt`` (token CE) and ``token_acc`` (argmax
        accuracy, no grad) when ``ids`` is given; ``kl`` (mean per-token KL over all present
        tokens), ``kl_img``/``kl_txt`` (per-modality means, no grad, for logging) and
        ``total = rec_img + rec_txt + beta_kl * kl`` over the present terms.
        """
        if images is None and ids is None:
            raise ValueError("UnifiedVAE.loss needs images, ids or both")
        out: dict[str, torch.Tensor] = {}
        kls: list[torch.Tensor] = []
        total = None
        if images is not None:
            mu, logvar = self.encode_image_raw(images)  # the KL of the raw posterior, as trained
            x_hat = self.decode_image_raw(self.sample(mu, logvar, generator), grid=self._grid_of(images))
            rec = F.mse_loss(x_hat.float(), images.float())
            out["rec_img"] = rec
            with torch.no_grad():
                out["psnr"] = 10.0 * torch.log10(4.0 / rec.detach().clamp_min(1e-12))
            kl = self.kl(mu, logvar).float()
            out["kl_img"] = kl.detach().mean()
            kls.append(kl.flatten())
            total = rec
        if ids is not None:
            mu, logvar = self.encode_text(ids)
            logits = self.decode_text(self.sample(mu, logvar, generator)).float()
            rec = F.cross_entropy(logits.flatten(0, 1), ids.flatten())
            out["rec_txt"] = rec
            with torch.no_grad():
                out["token_acc"] = (logits.argmax(-1) == ids).float().mean()
            kl = self.kl(mu, logvar).float()
            out["kl_txt"] = kl.detach().mean()
            kls.append(kl.flatten())
            total = rec if total is None else total + rec
        out["kl"] = torch.cat(kls).mean()
        out["total"] = total + self.cfg.beta_kl * out["kl"]
        return out

    def _grid_of(self, images: torch.Tensor) -> tuple[int, int]:
        s = self.downsample * self.cfg.patch_size
        return images.shape[-2] // s, images.shape[-1] // s

    def freeze_image_encoder(self) -> None:
        """Stop training the image encoder path (conv encoder + patch projection ``image_in``).

        The spec freezes it after the VAE stage, when ``data_prep/encode_laion.py`` stores the
        image latent moments. The shared trunk (and the modality embedding) stay trainable
        because text is VAE-encoded on the fly in pretraining. Consequence: once the trunk moves,
        :meth:`encode_image` on the live model no longer reproduces the stored moments, so
        pretraining must use the stored image moments (never re-encode images with the live
        model); re-encoding needs the checkpoint from the end of the VAE stage. The decoders stay
        trainable, so the reconstruction terms keep fitting the stored latents."""
        for module in (self.image_encoder, self.image_in):
            for p in module.parameters():
                p.requires_grad_(False)

    def freeze_for_pretraining(self) -> None:
        """Freeze everything but the text stems: the image encoder and decoder, the shared trunk
        (encoder and decoder) and the modality embedding.

        Why the shared trunk too: pretraining reads image latents stored by the VAE stage's
        encoder and has no pixels, so the image side has no reconstruction target. A trunk that
        kept learning from the text terms alone would move the shared latent space away from the
        stored image latents and from what the image decoder expects, and generated images would
        decode through a drifted trunk. With the trunk fixed, the latent space is the VAE stage's
        for both modalities; the text stems (token and position embeddings, vocabulary head) stay
        trainable, so the text reconstruction and KL terms remain part of the pretraining loss."""
        for module in (self.image_encoder, self.image_in, self.image_out, self.image_decoder,
                       self.trunk_enc, self.trunk_dec):
            for p in module.parameters():
                p.requires_grad_(False)
        self.modality_emb.requires_grad_(False)

    def image_encoder_parameters(self) -> list[nn.Parameter]:
        """The parameters :meth:`freeze_image_encoder` freezes."""
        return [*self.image_encoder.parameters(), *self.image_in.parameters()]
