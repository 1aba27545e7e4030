"""Import TLD / AT-1 PyTorch checkpoints into this project's weights, and export back.

python -m at1_jax.convert import tld_101m.pth out/tld-101m --variant legacy
python -m at1_jax.convert export out/tld-101m tld_101m.safetensors
python -m at1_jax.convert import tld_101m.safetensors out/again   # config recorded by export
"""

from __future__ import annotations

import argparse
import sys

from at1_jax.model.denoiser import BLOCKS
from at1_jax.model.torch_names import export_checkpoint, import_checkpoint, preset_name


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m at1_jax.convert", description=__doc__.split("\n")[0]
    )
    sub = parser.add_subparsers(dest="cmd", required=True)
    imp = sub.add_parser("import", help="PyTorch checkpoint → at1-jax weights folder")
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
    exp = sub.add_parser("export", help="at1-jax weights folder → PyTorch-named .safetensors")
    exp.add_argument("weights", help="at1-jax weights folder")
    exp.add_argument("out", help="output .safetensors")
    exp.add_argument("--dtype", choices=("float32", "float16"), default="float32")
    args = parser.parse_args(argv)
    try:
        if args.cmd == "import":
            cfg = import_checkpoint(
                args.checkpoint, args.out, args.variant, args.key, args.cross_heads
            )
            preset = preset_name(cfg) or "custom"
            print(f"imported {args.checkpoint} → {args.out} (preset: {preset}, {cfg})")
        else:
            cfg = export_checkpoint(args.weights, args.out, args.dtype)
            print(f"exported {args.weights} → {args.out} (config recorded in its metadata: {cfg})")
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
