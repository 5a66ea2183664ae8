"""Generate with a trained MDM: joint, text-to-image and image-to-text, to PNGs and caption tables.

    python launch/sample.py --checkpoint runs/tiny/export [--weights ema|raw] [--modes joint t2i i2t]
        [--num 8] [--steps 25] [--guidance 1.0] [--data MDS_DIR] [--prompt TEXT ...] [--out DIR]
    python launch/sample.py --checkpoint runs/tiny/checkpoints [--tag step_00000600] ...

``--checkpoint`` is either an export folder of launch/pretrain.py (``model.safetensors``,
``model_ema.safetensors``, ``config.yaml``) or a safetensors file beside a ``config.yaml``, or a
DeepSpeed checkpoint folder (``<run_dir>/checkpoints``, or one of its tag folders): its ZeRO
partitions are consolidated on CPU (DeepSpeed's ``zero_to_fp32``), and the EMA is rebuilt from
the per-rank trainer files. Conditions: t2i captions come from ``--prompt`` (needs
``data.tokenizer``), else from ``--data`` (the first samples of an MDS stream), else from the
captions that joint mode generated; i2t images likewise from ``--data`` latents, else the joint
images. Writes ``<out>/{joint,t2i,i2t}.png`` and ``<out>/captions.{json,md}``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from mdm_dist.config import ConfigError, config_from_dict, load_config  # noqa: E402


def _strip(sd: dict, prefix: str = "mdm.") -> dict:
    return {k[len(prefix):] if k.startswith(prefix) else k: v for k, v in sd.items()}


def _ema_from_rank_files(tag_dir: Path, full: dict) -> dict:
    """Whole EMA tensors from the per-rank shards: ZeRO-3 partitions each parameter into
    ceil(numel / world) slices, one per rank; stages 0-2 keep the whole tensor on every rank."""
    files = sorted(tag_dir.glob("trainer_rank*.pt"))
    shards = [torch.load(f, map_location="cpu", weights_only=False)["ema"]["shadow"] for f in files]
    out = {}
    for name, ref in full.items():
        parts = [s[name] for s in shards]
        if parts[0].numel() == ref.numel() and parts[0].shape == ref.shape:
            out[name] = parts[0]
        else:
            out[name] = torch.cat([p.flatten() for p in parts])[: ref.numel()].view(ref.shape)
    return out


def load_weights(checkpoint: str, tag: str | None, which: str):
    """(Config, state dict of the MDM) from an export or a DeepSpeed checkpoint."""
    p = Path(checkpoint)
    if p.is_file() and p.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_config(p.parent / "config.yaml"), load_file(str(p))
    if (p / "model.safetensors").is_file():
        from safetensors.torch import load_file

        f = p / ("model_ema.safetensors" if which == "ema" else "model.safetensors")
        if not f.is_file():
            raise FileNotFoundError(f"{f} does not exist (use --weights raw)")
        return load_config(p / "config.yaml"), load_file(str(f))
    # DeepSpeed checkpoint
    if (p / "latest").is_file() or tag:
        load_dir, tag = p, tag or (p / "latest").read_text().strip()
    elif any(p.glob("trainer_rank*.pt")):
        load_dir, tag = p.parent, p.name
    else:
        raise FileNotFoundError(f"{p}: neither an export folder (model.safetensors) nor a DeepSpeed checkpoint")
    tag_dir = load_dir / tag
    states = sorted(tag_dir.glob("*model_states.pt"))
    if not states:
        raise FileNotFoundError(f"{tag_dir} has no DeepSpeed model states")
    client = torch.load(states[0], map_location="cpu", weights_only=False)
    cfg = config_from_dict(client["config"], where=str(tag_dir))
    if not list(tag_dir.glob("*zero_pp_rank_*optim_states.pt")):  # stage 0: whole weights in the model states
        full = _strip({k: v.float() for k, v in client["module"].items()})
    else:
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        full = _strip(get_fp32_state_dict_from_zero_checkpoint(str(load_dir), tag=tag))
    if which == "ema":
        full = _ema_from_rank_files(tag_dir, full)
    return cfg, full


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoint", required=True)
    ap.add_argument("--tag", default=None, help="DeepSpeed checkpoint tag (default: latest)")
    ap.add_argument("--weights", choices=("ema", "raw"), default="ema")
    ap.add_argument("--modes", nargs="+", default=["joint", "t2i", "i2t"], choices=("joint", "t2i", "i2t"))
    ap.add_argument("--num", type=int, default=8)
    ap.add_argument("--steps", type=int, default=None, help="sampler steps (default diffusion.sample_steps)")
    ap.add_argument("--sampler", default=None, choices=("dpm2", "ddim", "euler"))
    ap.add_argument("--guidance", type=float, default=None)
    ap.add_argument("--category", type=int, default=0)
    ap.add_argument("--data", default=None, help="an MDS stream whose first samples give t2i / i2t conditions")
    ap.add_argument("--prompt", nargs="*", default=None, help="captions for t2i (needs data.tokenizer)")
    ap.add_argument("--tokenizer", default=None, help="tokenizer directory (default: the config's data.tokenizer)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None, help="output folder (default <checkpoint>/samples)")
    ap.add_argument("--set", action="append", default=[], help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    from mdm_dist.data.vae_checkpoint import tolerate_missing_latent_stats
    from mdm_dist.diffusion import sample
    from mdm_dist.models.mdm import build_model
    from mdm_dist.train.samples import Decoder, write_captions
    from mdm_dist.viz import image_grid

    try:
        cfg, state = load_weights(args.checkpoint, args.tag, args.weights)
    except (ConfigError, FileNotFoundError) as e:
        print(f"sample.py: error: {e}", file=sys.stderr)
        return 2
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = build_model(cfg, device=device)
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = tolerate_missing_latent_stats(missing, str(args.checkpoint))
    if [m for m in missing if "." in m] or unexpected:
        print(f"sample.py: error: weights do not fit the config: missing {missing[:5]}, unexpected {unexpected[:5]}",
              file=sys.stderr)
        return 2
    model.eval()
    decode = Decoder(args.tokenizer if args.tokenizer is not None else cfg.data.tokenizer, cfg.vae.pad_id, cfg.vae.mask_id)
    out = Path(args.out or Path(args.checkpoint) / "samples")
    out.mkdir(parents=True, exist_ok=True)
    g = torch.Generator(device=device).manual_seed(args.seed)
    kw = dict(steps=args.steps, sampler=args.sampler, guidance_scale=args.guidance, generator=g, category=args.category)

    cond_ids = cond_lat = None
    if args.prompt:
        if decode.tok is None:
            print("sample.py: error: --prompt needs a tokenizer (--tokenizer DIR or data.tokenizer)", file=sys.stderr)
            return 2
        cond_ids = torch.stack([torch.from_numpy(decode.tok.encode_fixed(t, cfg.vae.max_text_len)) for t in args.prompt])
    if args.data:
        from streaming import StreamingDataset

        from mdm_dist.data.loader import MDMCollator, prepare_streaming_env

        prepare_streaming_env()
        ds = StreamingDataset(local=args.data, shuffle=False, batch_size=args.num)
        batch = MDMCollator(cfg.vae.max_text_len, cfg.vae.pad_id)([ds[i] for i in range(min(args.num, len(ds)))])
        cond_ids = batch["ids"] if cond_ids is None else cond_ids
        cond_lat = batch["img_mu"]

    rows: list[dict] = []
    joint = None
    for mode in args.modes:
        if mode == "joint" or (mode in ("t2i", "i2t") and joint is None and
                               (cond_ids if mode == "t2i" else cond_lat) is None):
            joint = joint or sample(model, "joint", batch_size=args.num, **kw)
        if mode == "joint":
            res = joint
        elif mode == "t2i":
            ids = (cond_ids if cond_ids is not None else joint["ids"]).to(device)
            res = sample(model, "t2i", ids=ids, **kw)
        else:
            lat = (cond_lat if cond_lat is not None else joint["img_latents"]).to(device)
            res = sample(model, "i2t", img_latents=lat, **kw)
        texts = [decode(r) for r in res["ids"].cpu()]
        image_grid(res["images"].cpu(), out / f"{mode}.png", ncol=min(4, len(texts)),
                   labels=[t[:40] for t in texts], title=f"{mode} ({args.weights} weights)")
        rows += [{"mode": mode, "index": i, "text": t} for i, t in enumerate(texts)]
    write_captions(rows, out / "captions")
    print(f"wrote {', '.join(m + '.png' for m in args.modes)} and captions.json/.md to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
