"""Import TLD / AT-1 PyTorch checkpoints into this project's weights, and export back.

python -m at1_jax.convert import tld_101m.pth out/tld-101m --variant legacy
python -m at1_jax.convert export out/tld-101m tld_101m.safetensors
python -m at1_jax.convert import tld_101m.safetensors out/again   # config recorded by export

Both carry the model card: import writes OUT/model_card.{json,md} (the card an exported file
holds in its header, else one that says the training data is unknown); export puts the
folder's card in the file's header and beside it (tld_101m.model_card.{json,md}).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from at1_io.help_format import DefaultsHelpFormatter
from at1_jax.checkpointing import model_card
from at1_jax.model import weights
from at1_jax.model.denoiser import BLOCKS
from at1_jax.model.torch_names import (
    CARD_METADATA,
    export_checkpoint,
    import_checkpoint,
    preset_name,
    read_header,
)


def carried_card(path: str) -> dict | None:
    """The model card an exported .safetensors holds in its header, if any."""
    raw = read_header(path, CARD_METADATA)
    if raw is None:
        return None
    try:
        card = json.loads(raw)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: header entry {CARD_METADATA!r} is not JSON ({e})") from None
    return card if isinstance(card, dict) else None


def import_with_card(path: str, out: str, variant=None, key=None, cross_heads=None):
    """`import_checkpoint`, then the folder's model card; returns (config, card)."""
    cfg = import_checkpoint(path, out, variant, key, cross_heads)
    card = model_card.converted_card(cfg, "imported", os.path.abspath(path), carried_card(path))
    model_card.write(out, card)
    return cfg, model_card.read(out)


def export_with_card(weights_dir: str, out: str, dtype: str = "float32"):
    """`export_checkpoint` with the folder's card in the header and beside the file."""
    cfg = weights.load_config(weights_dir)
    source = os.path.abspath(weights_dir)
    card = model_card.converted_card(cfg, "exported", source, model_card.read(weights_dir))
    header = {CARD_METADATA: json.dumps(card, sort_keys=True)}
    export_checkpoint(weights_dir, out, dtype, header)
    stem = os.path.basename(out).removesuffix(".safetensors")
    model_card.write(os.path.dirname(os.path.abspath(out)), card, prefix=f"{stem}.")
    return cfg, card


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        formatter_class=DefaultsHelpFormatter,
        prog="python -m at1_jax.convert",
        description=__doc__.split("\n")[0],
    )
    sub = parser.add_subparsers(dest="cmd", required=True)
    imp = sub.add_parser(
        "import",
        formatter_class=DefaultsHelpFormatter,
        help="PyTorch checkpoint → at1-jax weights folder",
    )
    imp.add_argument("checkpoint", help=".pth/.pt/.bin (torch.save) or .safetensors")
    imp.add_argument("out", help="output folder")
    imp.add_argument(
        "--variant",
        choices=BLOCKS,
        help="block layout, required unless the file records it (files from `export` do): "
        "legacy = released TLD-101M and AT-1 (x = norm1(attn(x) + x)), "
        "prenorm = TLD's main branch (x = attn(norm1(x)) + x)",
    )
    imp.add_argument(
        "--key", help="top-level key holding the state_dict (default: auto, e.g. model_ema)"
    )
    imp.add_argument(
        "--cross-heads",
        type=int,
        help="cross-attention heads (default: recorded in the file, else 4 legacy, "
        "width // 64 prenorm)",
    )
    exp = sub.add_parser(
        "export",
        formatter_class=DefaultsHelpFormatter,
        help="at1-jax weights folder → PyTorch-named .safetensors",
    )
    exp.add_argument("weights", help="at1-jax weights folder")
    exp.add_argument("out", help="output .safetensors")
    exp.add_argument("--dtype", choices=("float32", "float16"), default="float32")
    args = parser.parse_args(argv)
    try:
        if args.cmd == "import":
            cfg, card = import_with_card(
                args.checkpoint, args.out, args.variant, args.key, args.cross_heads
            )
            preset = preset_name(cfg) or "custom"
            print(f"imported {args.checkpoint} → {args.out} (preset: {preset}, {cfg})")
        else:
            cfg, card = export_with_card(args.weights, args.out, args.dtype)
            print(f"exported {args.weights} → {args.out} (config recorded in its metadata: {cfg})")
        print(f"model card: {card['summary']}")
    except (ValueError, FileNotFoundError, model_card.CardError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
