"""`python -m at1_jax.serve RUN_OR_WEIGHTS`: the generation page and its JSON API.

Loads the model once, then serves `/` (the page), `POST /generate`, `/info`, `/stats` and
`/docs` on 127.0.0.1 unless --host says otherwise. See docs/serve.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import ipaddress
import socket
import sys

import jax

from at1_io.constants import DEFAULT_TEXT_ENCODER, DEFAULT_VAE
from at1_io.help_format import DefaultsHelpFormatter
from at1_jax.checkpointing.load import DEFAULT_CACHE, MissingFiles
from at1_jax.generate.pipeline import Pipeline
from at1_jax.serve import command
from at1_jax.serve.batcher import Batcher
from at1_jax.serve.engine import Engine
from at1_jax.serve.schema import Limits
from at1_jax.torch_bridge import MissingExtra


def _batch_sizes(value: str) -> list[int]:
    try:
        sizes = sorted({int(v) for v in value.split(",")})
    except ValueError:
        sizes = []
    if not sizes or sizes[0] < 1:
        raise argparse.ArgumentTypeError(f"want comma-separated sizes >= 1, e.g. 1,4,16: {value!r}")
    return sizes


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        formatter_class=DefaultsHelpFormatter,
        prog="python -m at1_jax.serve",
        description=__doc__.split("\n")[0],
    )
    p.add_argument(
        "checkpoint", metavar="RUN_OR_WEIGHTS", help="weights folder or training run (or s3://)"
    )
    p.add_argument(
        "--host",
        default="127.0.0.1",
        help="address to listen on; any other than loopback lets the network use the model "
        "(there is no authentication); default %(default)s",
    )
    p.add_argument(
        "--port", type=int, default=8000, help="0 picks a free port (printed); default %(default)s"
    )
    p.add_argument(
        "--text-encoder",
        help=f"[kind=]id or folder (default: from the checkpoint, else {DEFAULT_TEXT_ENCODER})",
    )
    p.add_argument(
        "--vae",
        help=f"diffusers VAE id/folder, or 'pixel' (default: checkpoint's, else {DEFAULT_VAE})",
    )
    p.add_argument(
        "--decode",
        default="jax",
        choices=("jax", "torch"),
        help="VAE decoder: jax (Flax) or torch (diffusers); default %(default)s",
    )
    p.add_argument("--latent-scale", type=float, help="raw VAE latent = x0 · this (default 8)")
    p.add_argument(
        "--cache-dir", default=DEFAULT_CACHE, help="text-embedding cache; default %(default)s"
    )
    p.add_argument(
        "--batch-sizes",
        type=_batch_sizes,
        default="1,4,16",
        help="compiled batch sizes: a call of n images runs at the smallest size >= n; one "
        "size makes an image's bytes independent of what it was batched with; default 1,4,16",
    )
    p.add_argument(
        "--max-images", type=int, default=64, help="images per request; default %(default)s"
    )
    p.add_argument(
        "--max-steps", type=int, default=100, help="sampler steps per request; default %(default)s"
    )
    p.add_argument(
        "--max-queued-images",
        type=int,
        default=256,
        help="images accepted and not yet answered; more gets HTTP 503 (bounds memory); "
        "default %(default)s",
    )
    p.add_argument(
        "--max-programs",
        type=int,
        default=16,
        help="compiled sampler programs kept, one per (steps, guidance, sampler, batch size); "
        "default %(default)s",
    )
    p.add_argument(
        "--batch-window-ms",
        type=float,
        default=50.0,
        help="how long the first request waits for others to share its batch; default %(default)s",
    )
    return p


def _check(args: argparse.Namespace) -> None:
    for flag in ("max_images", "max_steps", "max_programs"):
        if getattr(args, flag) < 1:
            raise ValueError(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}")
    if args.max_queued_images < args.max_images:
        raise ValueError(
            f"--max-queued-images {args.max_queued_images} is less than --max-images "
            f"{args.max_images}: a request at the limit could never be queued"
        )
    if not (0 <= args.port <= 65535) or args.batch_window_ms < 0:
        raise ValueError("--port must be 0..65535 and --batch-window-ms >= 0")


def _listen(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(128)  # connections wait in the backlog until uvicorn accepts them
    return sock


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    try:
        _check(args)
        pipe = Pipeline(
            args.checkpoint,
            text_encoder=args.text_encoder,
            decode=args.decode,
            vae=args.vae,
            latent_scale=args.latent_scale,
            batch_size=args.batch_sizes[-1],
            cache_dir=args.cache_dir,
        )
        pipe.require([])  # the decoder's files; prompts are checked per request
    except (MissingFiles, MissingExtra, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    engine = Engine(pipe, args.max_programs)
    batcher = Batcher(
        engine.pngs,
        args.batch_sizes,
        args.max_queued_images,
        args.batch_window_ms / 1000,
        compiles=lambda: engine.compiles.count,
    )
    flags = command.model_flags(
        args.checkpoint,
        text_encoder=args.text_encoder,
        vae=args.vae,
        decode=args.decode,
        latent_scale=args.latent_scale,
        cache_dir=args.cache_dir,
        default_cache_dir=DEFAULT_CACHE,
    )
    model_info = {
        "checkpoint": args.checkpoint,
        "text_encoder": pipe.text_encoder,
        "decode": dataclasses.asdict(pipe.decode_spec),
        "backend": jax.default_backend(),
    }

    def stats() -> dict:
        return {
            **batcher.stats(),
            "xla_compiles": engine.compiles.count,
            "programs": engine.programs,
        }

    try:
        sock = _listen(args.host, args.port)
    except OSError as e:
        print(
            f"error: cannot listen on {args.host}:{args.port} ({e}); pass another --port "
            "(0 picks a free one)",
            file=sys.stderr,
        )
        return 2
    limits = Limits(args.max_images, args.max_steps)
    return _serve(sock, batcher, limits, model_info, flags, pipe, stats)


def _serve(sock, batcher, limits, model_info, flags, pipe, stats) -> int:
    import uvicorn

    from at1_jax.serve.app import create_app

    app = create_app(batcher, limits, model_info, flags, pipe.require, stats)
    host, port = sock.getsockname()[:2]
    url_host = f"[{host}]" if ":" in host else host
    if not _is_loopback(host):
        print(
            f"warning: listening on {host}, not loopback: anyone who can reach port {port} can "
            "generate with this model (no authentication)",
            file=sys.stderr,
        )
    print(f"serving {model_info['checkpoint']} at http://{url_host}:{port}/", flush=True)
    uvicorn.Server(uvicorn.Config(app, log_level="info")).run(sockets=[sock])
    return 0
