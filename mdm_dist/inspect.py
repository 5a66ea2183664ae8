"""Inspect a config without allocating weights: parameters, training FLOPs, ZeRO-3 memory.

    python -m mdm_dist.inspect configs/7b.yaml [--gpus 8 64 256] [--micro-batch 1] [--set k=v ...]

Everything is measured on the meta device from the real modules, not from a formula:
- parameters: counted per component from the built model;
- FLOPs: ``torch.utils.flop_counter.FlopCounterMode`` over a forward pass on meta tensors (the
  matmuls of the torch scan path included); training FLOPs per sample = 3 x forward (forward +
  backward) of the backbone, the VAE text encoder and two text decodes (reconstruction and the
  score-entropy read-out), as pretraining runs them on stored image latents;
- activations: bytes of the tensors autograd saves during one block's forward (a
  ``saved_tensors_hooks`` pack hook), times the block count; with activation checkpointing only
  each block's input is kept, plus one block's activations during its recomputation.
Model states under ZeRO-3: 16 bytes per parameter either way bf16 is applied (``autocast``: fp32
parameters and gradients + two fp32 Adam moments; ``bf16_weights``: bf16 parameters and
gradients + fp32 master weights + two moments), plus 4 for the fp32 EMA, divided over the GPUs.

The last line of the output is ``total_params=<integer>``.
"""

from __future__ import annotations

import argparse
import sys
from collections import OrderedDict

import torch
from torch.utils.flop_counter import FlopCounterMode

from mdm_dist.config import ConfigError, load_config
from mdm_dist.models.mdm import build_model

GIB = 1024**3


def component_params(model) -> "OrderedDict[str, int]":
    """Parameter counts grouped into components a reader recognises."""
    groups: OrderedDict[str, int] = OrderedDict()

    def add(name, n):
        groups[name] = groups.get(name, 0) + n

    for name, p in model.named_parameters():
        n = p.numel()
        if name.startswith("vae."):
            sub = name.split(".")[1]
            add(f"vae.{sub}", n)
        elif ".mixers." in name:
            add("backbone.mamba_mixers", n)
        elif ".ada." in name or name.startswith("backbone.txt_pool"):
            add("backbone.adaln", n)
        elif name.startswith("backbone.layers.") and ".norm." in name:
            add("backbone.block_norms", n)
        elif name.startswith("backbone.layers."):
            add("backbone.attention_blocks", n)
        else:
            add("backbone.embed_heads_skips", n)
    return groups


def _meta_inputs(cfg, batch: int):
    layout_len = cfg.vae.max_text_len
    n_img = (cfg.vae.image_size // (2 ** (len(cfg.vae.channel_mult) - 1) * cfg.vae.patch_size)) ** 2
    kw = dict(device="meta")
    return dict(
        txt=torch.empty(batch, layout_len, cfg.vae.d_z, **kw),
        img=torch.empty(batch, n_img, cfg.vae.d_z, **kw),
        t_txt=torch.empty(batch, **kw),
        t_img=torch.empty(batch, **kw),
        category=torch.zeros(batch, dtype=torch.long, **kw),
    )


def forward_flops(model, cfg) -> dict[str, int]:
    """Forward FLOPs for one sample, per part, counted on meta tensors."""
    inp = _meta_inputs(cfg, 1)
    ids = torch.zeros(1, cfg.vae.max_text_len, dtype=torch.long, device="meta")
    out = {}
    # Grad mode stays on (FlopCounterMode's module tracker expects it); meta tensors cost nothing.
    with FlopCounterMode(display=False) as fc:
        model.backbone(**inp)
    out["backbone"] = fc.get_total_flops()
    with FlopCounterMode(display=False) as fc:
        mu, _ = model.vae.encode_text(ids)
    out["vae_text_encode"] = fc.get_total_flops()
    with FlopCounterMode(display=False) as fc:
        model.vae.decode_text(mu.detach())
    out["vae_text_decode"] = fc.get_total_flops()
    img = torch.empty(1, 3, cfg.vae.image_size, cfg.vae.image_size, device="meta")
    with FlopCounterMode(display=False) as fc:
        mu_i, _ = model.vae.encode_image(img)
    out["vae_image_encode"] = fc.get_total_flops()
    with FlopCounterMode(display=False) as fc:
        model.vae.decode_image(mu_i.detach())
    out["vae_image_decode"] = fc.get_total_flops()
    return out


def block_activation_bytes(model, cfg, micro_batch: int, dtype: torch.dtype) -> tuple[int, int]:
    """(bytes saved for backward by one Mamba block, bytes of one block input) at ``micro_batch``."""
    backbone = model.backbone
    block = next(l for k, l in zip(backbone.layer_kinds, backbone.layers) if k == "mamba")
    T = backbone.layout.length
    x = torch.empty(micro_batch, T, cfg.model.d_model, device="meta", dtype=dtype, requires_grad=True)
    orders = backbone.scan_orders(torch.device("meta"))
    seen: dict[int, int] = {}

    def pack(t):
        seen[id(t)] = t.numel() * (dtype.itemsize if t.is_floating_point() else t.element_size())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        block(x, orders)
    return sum(seen.values()), x.numel() * dtype.itemsize


def report(cfg_path: str, overrides: list[str], gpus: list[int], micro_batch: int, file=sys.stdout) -> int:
    cfg = load_config(cfg_path, overrides)
    model = build_model(cfg, device="meta")
    groups = component_params(model)
    total = sum(groups.values())
    p = lambda *a: print(*a, file=file)  # noqa: E731

    p(f"config: {cfg_path}  ({cfg.name})")
    lay = model.backbone.layout
    p(f"backbone: {cfg.model.n_layers} Mamba blocks x d_model {cfg.model.d_model}, scan_mode {cfg.model.scan_mode}, "
      f"directions {cfg.model.image_directions}, attention blocks {model.backbone.layer_kinds.count('attn')}")
    p(f"sequence: {lay.length} tokens ({lay.text_len} text, {lay.grid_h}x{lay.grid_w} image, "
      f"{lay.num_image_slots - lay.grid_h * lay.grid_w} lateral pads, {lay.num_tail_pad} tail pads)")
    p("")
    p("parameters per component")
    for name, n in groups.items():
        p(f"  {name:<32s} {n:>16,d}  ({n / total:6.2%})")
    p(f"  {'total':<32s} {total:>16,d}  ({total / 1e9:.3f} B)")

    flops = forward_flops(model, cfg)
    train = 3 * (flops["backbone"] + flops["vae_text_encode"] + 2 * flops["vae_text_decode"])
    p("")
    p("forward FLOPs per sample")
    for name, f in flops.items():
        p(f"  {name:<32s} {f / 1e9:>14,.2f} GFLOP")
    p(f"  training FLOPs per sample (3 x forward of backbone + text enc + 2 text dec): {train / 1e12:,.3f} TFLOP")

    n_blocks = cfg.model.n_layers
    bf16_model = build_model(cfg, device="meta", dtype=torch.bfloat16)
    act_block, act_in = block_activation_bytes(bf16_model, cfg, micro_batch, torch.bfloat16)
    act_none = n_blocks * act_block
    act_ckpt = n_blocks * act_in + act_block
    states_per_param = 16 + 4  # bf16 param + bf16 grad + fp32 master + 2 fp32 Adam moments; + fp32 EMA
    p("")
    p(f"ZeRO-3 memory per GPU (bf16, micro-batch {micro_batch}, activations of the Mamba blocks)")
    p(f"  {'GPUs':>6s} {'model states':>14s} {'act (no ckpt)':>14s} {'act (ckpt)':>14s} {'total no ckpt':>14s} {'total ckpt':>12s}")
    for n in gpus:
        states = total * states_per_param / n
        p(f"  {n:>6d} {states / GIB:>11.2f} GiB {act_none / GIB:>10.2f} GiB {act_ckpt / GIB:>10.2f} GiB "
          f"{(states + act_none) / GIB:>10.2f} GiB {(states + act_ckpt) / GIB:>8.2f} GiB")
    p(f"total_params={total}")
    return total


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m mdm_dist.inspect", description=__doc__.split("\n")[0])
    ap.add_argument("config", help="YAML config, e.g. configs/7b.yaml")
    ap.add_argument("--gpus", type=int, nargs="+", default=[8, 64, 256], help="GPU counts for the ZeRO-3 memory table")
    ap.add_argument("--micro-batch", type=int, default=1, help="samples per GPU for the activation estimate")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="dotted config override, e.g. --set model.n_layers=24")
    args = ap.parse_args(argv)
    try:
        report(args.config, args.overrides, args.gpus, args.micro_batch)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
