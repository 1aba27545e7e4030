"""The web application: the page at `/`, `POST /generate` (JSON), `GET /info` and `GET /stats`.

FastAPI (Starlette, served by uvicorn) and one static page rather than Gradio: the JSON API is
what scripts use and the page is a thin client of it, so both get the same validation, limits
and batching. FastAPI validates requests with pydantic (4xx with the field and value) and
describes the API at /docs, for four small packages; Gradio would bring its own queue (the
server needs its own: one worker owns the model and batches across requests), a large
front-end bundle and a websocket protocol that scripts would have to speak.
"""

import asyncio
import base64
import contextlib
import dataclasses
import time
from collections.abc import Callable, Sequence

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse

from at1_jax.checkpointing.load import MissingFiles
from at1_jax.model.samplers import SAMPLERS
from at1_jax.serve.batcher import Batcher, QueueFull
from at1_jax.serve.command import sample_command
from at1_jax.serve.page import PAGE
from at1_jax.serve.schema import DEFAULT_NUM_IMAGES, DEFAULTS, Limits, error_line, request_model
from at1_jax.torch_bridge import MissingExtra


def _error(status: int, message: str, **headers: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers or None)


def create_app(
    batcher: Batcher,
    limits: Limits,
    model_info: dict,
    sample_flags: Sequence[str],
    require: Callable[[Sequence[str]], None],
    stats: Callable[[], dict],
) -> FastAPI:
    """The app around a running batcher; `require(prompts)` raises if they cannot be embedded."""
    GenerateRequest = request_model(limits)

    @contextlib.asynccontextmanager
    async def lifespan(_):
        yield
        batcher.close()

    app = FastAPI(
        title="at1-jax generation",
        summary="Text-to-image with a trained at1-jax denoiser (docs/serve.md).",
        lifespan=lifespan,
    )

    @app.exception_handler(RequestValidationError)
    async def invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        return _error(422, error_line(exc.errors()))

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def page() -> str:
        return PAGE

    @app.get("/info")
    async def info() -> dict:
        """The model, the defaults and limits of a request, and the compiled batch sizes."""
        return {
            "model": model_info,
            "defaults": {
                "num_images": DEFAULT_NUM_IMAGES,
                "seed": DEFAULTS.seed,
                "steps": DEFAULTS.steps,
                "guidance": DEFAULTS.guidance,
                "sampler": DEFAULTS.sampler,
            },
            "limits": dataclasses.asdict(limits),
            "samplers": list(SAMPLERS),
            "batch_sizes": batcher.sizes,
        }

    @app.get("/stats")
    async def get_stats() -> dict:
        """Queued images, batches run, XLA compiles and sampler programs held."""
        return stats()

    @app.post("/generate")
    async def generate(req: GenerateRequest) -> JSONResponse:
        """PNGs (base64) with their prompt, seed and the sample command that remakes them."""
        sampler = req.sampler_config()
        prompts = [p for p in req.prompts for _ in range(req.num_images)]
        seeds = [req.seed + k for _ in req.prompts for k in range(req.num_images)]
        try:
            require(req.prompts)
            future = batcher.submit(prompts, seeds, sampler)
        except (MissingFiles, MissingExtra) as e:
            return _error(503, f"cannot embed these prompts on this server: {e}")
        except QueueFull as e:
            return _error(503, str(e), **{"Retry-After": "1"})
        t0 = time.perf_counter()
        try:
            result = await asyncio.wrap_future(future)
        except Exception as e:
            return _error(500, f"generation failed ({type(e).__name__}: {e}); see the server log")
        images = [
            {
                "prompt": p,
                "seed": s,
                "batch_size": im.batch_size,
                "png_base64": base64.b64encode(im.png).decode("ascii"),
                "sample_command": sample_command(
                    sample_flags, [p], 1, dataclasses.replace(sampler, seed=s), im.batch_size
                ),
            }
            for p, s, im in zip(prompts, seeds, result.images, strict=True)
        ]
        sizes = sorted({im.batch_size for im in result.images})
        whole = None
        if len(sizes) == 1:  # one command remakes the whole request
            whole = sample_command(sample_flags, req.prompts, req.num_images, sampler, sizes[0])
        settings = req.model_dump()
        return JSONResponse(
            {
                "images": images,
                "settings": settings,
                "model": model_info,
                "sample_command": whole,
                "batch": result.batch,
                "seconds": round(time.perf_counter() - t0, 3),
            }
        )

    return app
