"""Model flags: references checked before loading, loaded weights must fit the flag's class."""

from __future__ import annotations

import difflib
import os

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
        f"{flag}: the checkpoint holds a {model_type!r} model: {len(missing)} of {total} "
        f"{cls_name} weights are missing from it ({shown}, ...) and would be random; {advice}"
    )


def load_error(flag: str, cls_name: str, model: str, err: Exception, advice: str) -> ModelError:
    """The ModelError for a loader that failed, naming the flag and the model."""
    return ModelError(
        f"{flag}: cannot load {cls_name} from {model} ({type(err).__name__}: {err}); {advice}"
    )


def _looks_local(ref: str) -> bool:
    return os.path.isabs(ref) or ref.startswith((".", "~")) or os.path.exists(ref)


def check_ref(flag: str, ref: str, subfolder: str | None = None, known: tuple = ()) -> None:
    """Raise ModelError unless ``ref`` is a model folder or a hub id that can be loaded."""
    # ``known`` are the flag's special values (``pixel``): a near miss of one is named.
    if _looks_local(ref):
        folder = os.path.join(os.path.expanduser(ref), subfolder or "")
        if not os.path.isdir(folder):
            raise ModelError(f"{flag}: no such folder {folder}")
        if not os.path.isfile(os.path.join(folder, "config.json")):
            raise ModelError(f"{flag}: {folder} has no config.json: not a saved model folder")
        return
    close = difflib.get_close_matches(ref, known, n=1)
    if close:
        raise ModelError(f"{flag}: not a local folder; did you mean {flag.split()[0]} {close[0]}?")
    from huggingface_hub import constants, try_to_load_from_cache
    from huggingface_hub.errors import HFValidationError

    config = f"{subfolder}/config.json" if subfolder else "config.json"
    try:
        cached = try_to_load_from_cache(ref, config)
    except HFValidationError as e:
        raise ModelError(f"{flag}: neither a local folder nor a hub model id ({e})") from e
    if constants.HF_HUB_OFFLINE and not isinstance(cached, str):
        raise ModelError(
            f"{flag}: not a local folder and not in the local hub cache, and HF_HUB_OFFLINE is "
            "set: download it first (unset HF_HUB_OFFLINE) or give a local folder"
        )
