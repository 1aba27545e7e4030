"""Model references of the CLI flags: loaded weights must fit the class the flag asks for."""

from __future__ import annotations

KIND_HELP = (
    "use the kind that matches the model: clip (a CLIP text tower with projection), "
    "t5 (a T5 encoder), sentence (a BERT-like encoder, mean pooled)"
)
VAE_HELP = "--vae takes a diffusers AutoencoderKL folder or hub id (--vae-subfolder for a pipeline)"


class ModelError(ValueError):
    """A model reference that cannot be used for its flag; raised before any work starts."""


def check_weights(
    flag: str, cls_name: str, model_type: str | None, missing: list[str], total: int, advice: str
) -> None:
    """Raise ModelError if weights of the class were absent from the checkpoint (left random)."""
    if not missing:
        return
    shown = ", ".join(sorted(missing)[:3])
    raise ModelError(
        f"{flag}: the folder holds a {model_type!r} model: {len(missing)} of {total} "
        f"{cls_name} weights are missing from it ({shown}, ...) and would be random; {advice}"
    )


def load_error(flag: str, cls_name: str, model: str, err: Exception, advice: str) -> ModelError:
    """The ModelError for a loader that failed, naming the flag and the model."""
    return ModelError(
        f"{flag}: cannot load {cls_name} from {model} ({type(err).__name__}: {err}); {advice}"
    )
