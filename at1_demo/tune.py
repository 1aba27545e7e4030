"""Choose the demo's generation settings on the validation prompts, never the held-out ones.

    python -m at1_demo.tune [--out outputs/demo] [--guidance 3,5,8] [--sampler-steps 20,40]

Generates the validation prompts (OUT/shapes/validation.txt: attribute combinations absent
from both the training images and the held-out test prompts) with the trained run
(OUT/run) for every combination of sampler, steps and guidance, scores each with the
analytic adherence scorer and prints the table, best first; OUT/tune.json keeps it. The
held-out prompts are scored by `python -m at1_demo` only, with the chosen settings.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys

from at1_demo import adherence
from at1_demo.demo import load_prompts
from at1_io.help_format import DefaultsHelpFormatter
from at1_jax.checkpointing.load import MissingFiles
from at1_jax.generate.pipeline import Pipeline
from at1_jax.model.samplers import SAMPLERS, SamplerConfig


def _numbers(text: str, kind: type) -> list:
    try:
        return [kind(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated {kind.__name__}s, got {text!r}"
        ) from None


def sweep(
    pipe: Pipeline,
    prompts: list[str],
    attributes: list,
    settings: list[SamplerConfig],
    num_images: int,
    seed: int,
) -> list[dict]:
    """Adherence of each sampler setting on `prompts` (num_images seeds each), best first."""
    all_prompts = [p for p in prompts for _ in range(num_images)]
    all_atts = [a for a in attributes for _ in range(num_images)]
    seeds = [seed + k for _ in prompts for k in range(num_images)]
    rows = []
    for sampler in settings:
        imgs, _ = pipe.generate(all_prompts, seeds, sampler)
        row = {"sampler": sampler.sampler, "steps": sampler.steps, "guidance": sampler.guidance}
        rows.append({**row, **adherence.score(list(imgs), all_atts)})
    return sorted(rows, key=lambda r: -r["mean"])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        formatter_class=DefaultsHelpFormatter,
        prog="python -m at1_demo.tune",
        description=__doc__.split("\n")[0],
    )
    p.add_argument("--out", default="outputs/demo", help="the demo's output folder")
    p.add_argument("--guidance", type=lambda t: _numbers(t, float), default=[3.0, 5.0, 8.0])
    p.add_argument("--sampler-steps", type=lambda t: _numbers(t, int), default=[20])
    p.add_argument("--samplers", type=lambda t: t.split(","), default=["dpmpp2m"])
    p.add_argument("--num-images", type=int, default=2, help="seeds per prompt")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    try:
        prompts, attributes = load_prompts(os.path.join(args.out, "shapes"), "validation")
        for name in args.samplers:
            if name not in SAMPLERS:
                raise ValueError(f"--samplers: unknown sampler {name!r}; known: {SAMPLERS}")
        settings = [
            SamplerConfig(steps=n, guidance=g, sampler=s, seed=args.seed)
            for s, n, g in itertools.product(args.samplers, args.sampler_steps, args.guidance)
        ]
        if args.num_images < 1:
            raise ValueError(f"--num-images must be >= 1, got {args.num_images}")
        pipe = Pipeline(os.path.join(args.out, "run"), batch_size=len(prompts) * args.num_images)
    except (MissingFiles, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    rows = sweep(pipe, prompts, attributes, settings, args.num_images, args.seed)
    cols = (*adherence.FIELDS, "mean")
    print(f"{'sampler':>9} {'steps':>5} {'guidance':>8}" + "".join(f"{c:>11}" for c in cols))
    for r in rows:
        head = f"{r['sampler']:>9} {r['steps']:>5} {r['guidance']:>8g}"
        print(head + "".join(f"{r[c]:11.2f}" for c in cols))
    with open(os.path.join(args.out, "tune.json"), "w") as f:
        json.dump({"prompts": "validation", "model": pipe.info.get("summary"), "rows": rows}, f)
    print(f"validation prompts: {len(prompts)} × {args.num_images} seeds; {args.out}/tune.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
