"""diffusers AutoencoderKL weights → the Flax `VAEDecoder`: find, read and map them.

`load_vae_decoder` reads `config.json` + `diffusion_pytorch_model.safetensors` from a local
folder or a hub id (via `huggingface_hub.snapshot_download`). Only `decoder.*` and
`post_quant_conv.*` tensors are used. A legacy `.bin` checkpoint (when no safetensors file
exists) is read by `torch_pickle`, without torch and without running pickled code.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import safetensors.numpy
from flax import nnx

from at1_jax.decode.vae import CONFIG_NAME, VAEConfig, VAEDecoder
from at1_jax.model import torch_pickle

WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
WEIGHTS_NAME_BIN = "diffusion_pytorch_model.bin"


_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
_OLD_ATTN = re.compile(r"^(decoder\.mid_block\.attentions\.\d+)\.(query|key|value|proj_attn)\.")
_OLD_ATTN_NEW = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}


def _weights_name(base: str, variant: str | None) -> str:
    """`diffusion_pytorch_model[.variant].ext` as diffusers names variant files."""
    if variant is None:
        return base
    stem, ext = base.rsplit(".", 1)
    return f"{stem}.{variant}.{ext}"


def _resolve_folder(
    path_or_hub_id: str | os.PathLike, subfolder: str | None, variant: str | None, revision
) -> Path:
    """A local folder holding config.json + weights, fetching from the hub if given an id."""
    path = Path(path_or_hub_id).expanduser()
    if path.exists():
        folder = path / subfolder if subfolder else path
        if not folder.is_dir():
            raise NotADirectoryError(f"VAE path {folder} is not a folder with {CONFIG_NAME}.")
        return folder
    repo_id = str(path_or_hub_id)
    if not _HUB_ID.match(repo_id):
        raise FileNotFoundError(f"VAE folder {path} does not exist (and is not a hub id).")
    prefix = f"{subfolder.strip('/')}/" if subfolder else ""
    wanted = [prefix + CONFIG_NAME, prefix + _weights_name(WEIGHTS_NAME, variant)]
    try:
        # Lazy: huggingface_hub is only needed for hub ids (it is not a core dependency).
        from huggingface_hub import snapshot_download

        root = snapshot_download(repo_id, revision=revision, allow_patterns=wanted)
    except Exception as e:
        raise OSError(
            f"Could not get the VAE {repo_id!r} from the Hugging Face Hub "
            f"(HF_HUB_OFFLINE={os.environ.get('HF_HUB_OFFLINE', '0')}): "
            f"{type(e).__name__}: {str(e).rstrip('.')}. "
            f"It needs {wanted[0]} and {wanted[1]}; put them in a folder and pass that folder."
        ) from e
    return Path(root) / prefix


def _read_safetensors(path: Path) -> dict[str, np.ndarray]:
    """All tensors of a safetensors file as numpy arrays (bfloat16 via ml_dtypes)."""
    try:
        return dict(safetensors.numpy.load_file(str(path)))
    except (KeyError, TypeError, ValueError):
        pass  # safetensors.numpy knows no BF16: fall through to a direct read of the format.
    dtypes = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16}
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(n))
        data = f.read()
    out = {}
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        if meta["dtype"] not in dtypes:
            raise ValueError(f"{path}: tensor {name} has unsupported dtype {meta['dtype']}.")
        start, end = meta["data_offsets"]
        arr = np.frombuffer(data[start:end], dtype=dtypes[meta["dtype"]])
        out[name] = arr.reshape(meta["shape"])
    return out


def _read_bin(path: Path) -> dict[str, np.ndarray]:
    """A torch.save checkpoint, read without torch and without running pickled code."""
    sd = torch_pickle.load(str(path))
    return {k: np.asarray(v, np.float32) for k, v in sd.items() if isinstance(v, np.ndarray)}


def _read_weights(folder: Path, variant: str | None) -> dict[str, np.ndarray]:
    st = folder / _weights_name(WEIGHTS_NAME, variant)
    if st.is_file():
        return _read_safetensors(st)
    binf = folder / _weights_name(WEIGHTS_NAME_BIN, variant)
    if binf.is_file():
        return _read_bin(binf)
    raise FileNotFoundError(f"VAE weights file {st.name} not found in {folder}.")


def _torch_shape(shape: tuple[int, ...]) -> tuple[int, ...]:
    """The PyTorch layout of a Flax parameter shape."""
    if len(shape) == 4:  # conv (kh, kw, I, O) <- (O, I, kh, kw)
        return (shape[3], shape[2], shape[0], shape[1])
    if len(shape) == 2:  # linear (I, O) <- (O, I)
        return (shape[1], shape[0])
    return tuple(shape)


def _to_flax(arr: np.ndarray, ndim: int) -> np.ndarray:
    if ndim == 4:
        return np.transpose(arr, (2, 3, 1, 0))
    if ndim == 2:
        return np.transpose(arr)
    return arr


def _torch_key(path: tuple) -> str:
    *mods, leaf = (str(p) for p in path)
    return ".".join([*mods, {"kernel": "weight", "scale": "weight"}.get(leaf, leaf)])


def _short(names: list[str], n: int = 12) -> str:
    more = f", ... ({len(names) - n} more)" if len(names) > n else ""
    return ", ".join(names[:n]) + more


def load_decoder_state(
    model: VAEDecoder, weights: Mapping[str, np.ndarray], dtype=jnp.float32
) -> VAEDecoder:
    """A copy of `model` (concrete or abstract) holding the diffusers `weights`, cast to dtype."""
    sd = {}
    for k, v in weights.items():
        if not (k.startswith("decoder.") or k.startswith("post_quant_conv.")):
            continue  # encoder.*, quant_conv.*: not needed to decode
        m = _OLD_ATTN.match(k)
        if m:  # pre-0.14 diffusers names, renamed exactly as ModelMixin does on load
            k = f"{m.group(1)}.{_OLD_ATTN_NEW[m.group(2)]}.{k[m.end() :]}"
            if k in weights:
                raise ValueError(f"VAE weights hold both the old and the new name of {k}.")
        sd[k] = v
    graphdef, state = nnx.split(model)
    flat = nnx.to_flat_state(state)
    missing, misshaped, filled = [], [], []
    for path, var in flat:
        key = _torch_key(path)
        shape = tuple(var.get_value().shape)
        if key not in sd:
            missing.append(key)
            continue
        arr = np.asarray(sd.pop(key))
        # Original LDM checkpoints store the attention projections as 1x1 convs.
        if len(shape) == 2 and arr.ndim == 4 and arr.shape[2:] == (1, 1):
            arr = arr[:, :, 0, 0]
        if tuple(arr.shape) != _torch_shape(shape):
            misshaped.append(f"{key} (expected {_torch_shape(shape)}, got {tuple(arr.shape)})")
            continue
        filled.append((path, var.replace(jnp.asarray(_to_flax(arr, len(shape)), dtype=dtype))))
    unexpected = sorted(sd)
    if missing or unexpected or misshaped:
        parts = []
        if missing:
            parts.append(f"missing keys: {_short(missing)}")
        if unexpected:
            parts.append(f"unexpected keys: {_short(unexpected)}")
        if misshaped:
            parts.append(f"wrong shapes: {_short(misshaped)}")
        raise ValueError(
            "VAE weights do not match the config (" + "; ".join(parts) + "). "
            "Check that config.json belongs to this diffusion_pytorch_model file."
        )
    return nnx.merge(graphdef, nnx.from_flat_state(filled))


def load_vae_decoder(
    path_or_hub_id: str | os.PathLike,
    dtype=jnp.float32,
    *,
    subfolder: str | None = None,
    variant: str | None = None,
    revision: str | None = None,
    precision: jax.lax.PrecisionLike = None,
) -> tuple[VAEDecoder, VAEConfig]:
    """Loads the decoder of a diffusers AutoencoderKL from a local folder or a hub id.

    Reads `config.json` and `diffusion_pytorch_model[.variant].safetensors` (a `.bin` only when
    no safetensors file exists and torch is installed). Parameters are stored and computed in
    `dtype`; group-norm statistics and the attention softmax stay in float32.
    """
    folder = _resolve_folder(path_or_hub_id, subfolder, variant, revision)
    cfg_path = folder / CONFIG_NAME
    if not cfg_path.is_file():
        raise FileNotFoundError(f"VAE config {CONFIG_NAME} not found in {folder}.")
    config = VAEConfig.from_json(cfg_path)
    weights = _read_weights(folder, variant)
    # Shapes only: the real values come from the checkpoint, so skip random initialisation.
    abstract = nnx.eval_shape(
        lambda: VAEDecoder(
            config, dtype=dtype, param_dtype=dtype, precision=precision, rngs=nnx.Rngs(0)
        )
    )
    return load_decoder_state(abstract, weights, dtype), config
