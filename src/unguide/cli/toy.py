"""``unguide train-toy`` and ``unguide toy-quality``: the embedded world's own commands."""
from __future__ import annotations

import argparse

from ..errors import UnguideError
from .common import add_model


def _channels(text: str) -> tuple[int, ...]:
    try:
        widths = tuple(int(w) for w in text.split(","))
    except ValueError:
        widths = ()
    if len(widths) != 3 or any(w < 16 or w % 16 for w in widths):
        raise argparse.ArgumentTypeError(f"{text!r}: give three comma-separated multiples of 16, e.g. 32,64,128")
    return widths


def _train_device(name: str) -> str:
    """The device a training stage runs on; a CUDA device that is not there is a usage error, not a crash."""
    import torch

    if name == "cpu":
        return name
    if not name.startswith("cuda"):
        raise UnguideError(f"unknown --device {name!r}: use cpu, cuda or cuda:N")
    if not torch.cuda.is_available():
        raise UnguideError(f"--device {name}: no CUDA device is visible here; use --device cpu")
    return name


def _cmd_train_toy(args) -> int:
    import torch

    from ..models.worlds import get_world

    device = _train_device(args.device)  # checked before any stage starts
    if args.threads:
        torch.set_num_threads(args.threads)
    unet = dict(steps=args.unet_steps, text_norm=args.text_norm)
    if args.stage != "export":  # export takes the architecture and text side from the checkpoint it exports
        unet.update(text_states=args.text_states, stop_after=args.stop_after, block_out_channels=args.unet_channels)
    mmdit = dict(steps=args.mmdit_steps, stop_after=args.stop_after, num_layers=args.mmdit_layers,
                 num_heads=args.mmdit_heads, init_from=args.init_from)
    get_world("toyworld").train(args.out, args.stage, args.classifier_steps, args.vae_steps, unet, args.max_minutes, device,
                                mmdit)
    return 0


def _cmd_toy_quality(args) -> int:
    from ..io import write_json
    from ..models.loading import load_model
    from ..models.worlds import world_of

    results = {}
    for name in [args.model] + ([args.beside] if args.beside else []):  # one after the other: timings compare
        bundle = load_model(name, device=args.device, dtype=args.dtype)
        if world_of(bundle) is None:
            raise UnguideError(f"{name} is not a toy-world model: toy-quality judges the embedded models' classes")
        results[name] = world_of(bundle).quality(bundle, samples=args.samples, guidance=args.guidance,
                                                 steps=args.steps, seed=args.seed)
    if args.out:
        write_json(args.out, results[args.model] if len(results) == 1 else results)
    for name, result in results.items():
        prefix = f"{name}: " if len(results) > 1 else ""
        for part in ("class_prompts", "heldout_synonyms"):
            r = result[part]
            print(f"{prefix}{part}: mean {r['mean']:.1%} | " + ", ".join(f"{c} {a:.0%}" for c, a in r["per_class"].items()))
        print(f"{prefix}seconds per image (batch 32, {args.steps} steps): "
              f"{result['class_prompts']['seconds_per_image']:.3f}")
    return 0


def add_parser(sub) -> None:
    from ..models.text import TEXT_STATES

    t = sub.add_parser("train-toy", help="train the embedded toy-world model (long; resumable)")
    t.add_argument("--stage", choices=["classifier", "vae", "unet", "all", "export", "mmdit", "export-mmdit"],
                   default="all", help="mmdit: train toyworld-flow's transformer by rectified flow (the VAE is "
                   "toyworld's, copied into --out when it has none); export-mmdit: write it from its checkpoint")
    t.add_argument("--out", default="work/toytrain")
    t.add_argument("--classifier-steps", type=int, default=1500)
    t.add_argument("--vae-steps", type=int, default=700)
    t.add_argument("--unet-steps", type=int, default=7000)
    t.add_argument("--mmdit-steps", type=int, default=6000)
    t.add_argument("--mmdit-layers", type=int, default=8, help="toyworld-flow's joint blocks (default 8)")
    t.add_argument("--mmdit-heads", type=int, default=4, help="attention heads of 32 channels (default 4)")
    t.add_argument("--init-from", default=None, help="mmdit: continue from a trained toyworld-flow directory "
                   "('toyworld-flow': the shipped weights) when --out has no checkpoint: adds steps up to --mmdit-steps "
                   "with a fresh optimizer")
    t.add_argument("--max-minutes", type=float, default=None, help="stop the UNet or MMDiT stage (checkpointed) after this long")
    t.add_argument("--stop-after", type=int, default=None,
                   help="end the UNet stage at this step of the --unet-steps schedule (checkpointed, then exported)")
    t.add_argument("--text-states", choices=TEXT_STATES,
                   default="contextual", help="how the frozen MiniLM's token states condition the UNet "
                   "(contextual: the committed weights; the others: see docs/findings-toyworld.md)")
    t.add_argument("--unet-channels", type=_channels, default=(32, 64, 128),
                   help="UNet block widths, comma-separated (default 32,64,128: the committed model)")
    t.add_argument("--text-norm", type=float, default=None,
                   help="scale the exported model's text states to this mean token norm (CLIP ViT-L: 27.7), "
                   "dividing the cross-attention key/value weights to match (the same model, SD-sized LoRA inputs)")
    t.add_argument("--threads", type=int, default=0)
    t.add_argument("--device", default="cpu", help="where the UNet stage trains: cpu (default), cuda or cuda:N")
    t.set_defaults(func=_cmd_train_toy)

    q = sub.add_parser("toy-quality", help="classifier accuracy of a toy-world model's samples, per class")
    add_model(q)
    q.add_argument("--samples", type=int, default=32)
    q.add_argument("--guidance", type=float, default=None)
    q.add_argument("--steps", type=int, default=50)
    q.add_argument("--seed", type=int, default=0)
    q.add_argument("--beside", default=None, help="a second toy-world model measured right after the first, the same "
                   "way (e.g. --model toyworld --beside toyworld-flow)")
    q.add_argument("--out", default=None, help="write the full result as JSON here (both models', keyed by name, "
                   "with --beside)")
    q.set_defaults(func=_cmd_toy_quality)
