"""Checkpoint I/O: model folders and hub repos <-> (flax module, params), validated parameter by parameter.

Formats are the published ones, so upstream files load unchanged and ours load upstream:
- DalleBart: `config.json` + `flax_model.msgpack` (layers scanned `[L, ...]` or unscanned `..._{i}`).
- VQGAN:     `config.json` + `flax_model.msgpack`.
- CLIP:      `config.json` + `flax_model.msgpack` (Flax names) or `model.safetensors` (PyTorch names).
Weights are never unpickled: `pytorch_model.bin` alone is refused.

Every loader takes a local folder or a hub repo id (downloaded only when a loader is called, never at
import) and checks the restored tree against the model's own: the first missing, unexpected or
misshapen parameter is named in one `CheckpointError`.
"""

import json
import re
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import serialization, traverse_util

from model.bart import DalleBart, DalleBartConfig
from model.clip import CLIP, CLIPConfig, params_from_torch_state_dict, params_to_torch_state_dict
from model.errors import CheckpointError
from model.vqgan import VQGAN, VQGANConfig

CONFIG_FILE = "config.json"
FLAX_WEIGHTS = "flax_model.msgpack"
SAFETENSORS_WEIGHTS = "model.safetensors"
PICKLED_WEIGHTS = "pytorch_model.bin"

# Scanned DalleBart checkpoints stack their layers under these names; unscanned ones use "<name>_{i}".
_SCANNED_LAYER_NAMES = {"encoder": "FlaxBartEncoderLayers", "decoder": "FlaxBartDecoderLayers"}
_UNSCANNED_LAYER_NAMES = {"encoder": "FlaxBartEncoderLayer", "decoder": "FlaxBartDecoderLayer"}
_REPO_ID = re.compile(r"^[\w.-]+/[\w.-]+$")


# ---------------------------------------------------------------------------------------------
# Folders, hub repos and files


def resolve_folder(path_or_repo, revision=None, allow_patterns=None) -> Path:
    """A local folder as is; an `owner/name` hub repo id downloaded (cached) at `revision`."""
    path = Path(path_or_repo).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise CheckpointError(f"{path} is a file; expected a model folder holding {CONFIG_FILE} and weights.")
    if not _REPO_ID.match(str(path_or_repo)):
        raise CheckpointError(f"No model folder at {path} (and it is not a hub repo id of the form owner/name).")
    # Imported here: huggingface_hub is only needed when a hub repo is actually asked for.
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    try:
        return Path(snapshot_download(str(path_or_repo), revision=revision, allow_patterns=allow_patterns))
    except (RepositoryNotFoundError, RevisionNotFoundError, GatedRepoError) as error:
        raise CheckpointError(
            f"Hub repo {path_or_repo!r} (revision {revision or 'main'}) is not available: {error}"
        ) from None
    except (LocalEntryNotFoundError, OSError) as error:
        raise CheckpointError(
            f"Could not download {path_or_repo!r} from the Hugging Face hub ({type(error).__name__}): the hub "
            "is unreachable from this machine or offline mode is on (HF_HUB_OFFLINE). Download the repo on a "
            "machine with access (`hf download " + str(path_or_repo) + " --local-dir FOLDER`) and pass that "
            "local folder instead."
        ) from None


def read_config(folder: Path) -> dict:
    file = folder / CONFIG_FILE
    if not file.is_file():
        raise CheckpointError(f"Missing {file}: a model folder needs its {CONFIG_FILE}.")
    try:
        config = json.loads(file.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise CheckpointError(f"{file} is not valid JSON: {error}") from None
    if not isinstance(config, dict):
        raise CheckpointError(f"{file} must hold a JSON object, not {type(config).__name__}.")
    return config


def read_msgpack(file: Path) -> dict:
    """A nested dict of numpy arrays from a flax msgpack file; corrupt files become CheckpointError."""
    if not file.is_file():
        raise CheckpointError(f"Missing {file}: the folder holds no {file.name}.")
    try:
        tree = serialization.msgpack_restore(file.read_bytes())
    except Exception as error:  # msgpack raises several unrelated types on truncated or foreign data
        raise CheckpointError(f"{file} is not a readable flax msgpack file ({type(error).__name__}: {error}).") from None
    if not isinstance(tree, dict):
        raise CheckpointError(f"{file} does not hold a parameter tree.")
    return tree


def read_safetensors(file: Path) -> dict:
    from safetensors.numpy import load_file

    try:
        return load_file(str(file))
    except Exception as error:  # safetensors raises its own error types on corrupt headers
        raise CheckpointError(f"{file} is not a readable safetensors file ({type(error).__name__}: {error}).") from None


def write_msgpack(file: Path, params) -> None:
    file.write_bytes(serialization.msgpack_serialize(jax.tree_util.tree_map(np.asarray, _unfreeze(params))))


def write_config(folder: Path, config: dict) -> None:
    (folder / CONFIG_FILE).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")


# ---------------------------------------------------------------------------------------------
# Validation


def _unfreeze(tree):
    return tree.unfreeze() if hasattr(tree, "unfreeze") else tree


def validate_params(expected, loaded, source) -> dict:
    """Check `loaded` against the shapes/dtypes in `expected`; return it as float arrays.

    `flax.serialization.from_bytes` silently keeps a target unchanged when keys are missing, so this
    compares the flattened trees key by key. Half-precision floats are widened to the model's dtype
    (some hub uploads store fp16); any other dtype difference is an error.
    """
    want = traverse_util.flatten_dict(_unfreeze(expected), sep="/")
    got = traverse_util.flatten_dict(_unfreeze(loaded), sep="/")
    for name in sorted(want):
        if name not in got:
            raise CheckpointError(f"{source}: missing parameter {name!r} (expected shape {tuple(want[name].shape)}).")
    for name in sorted(got):
        if name not in want:
            raise CheckpointError(f"{source}: unexpected parameter {name!r} (shape {tuple(np.shape(got[name]))}).")
    result = {}
    for name in sorted(want):
        value, spec = got[name], want[name]
        if tuple(np.shape(value)) != tuple(spec.shape):
            raise CheckpointError(
                f"{source}: parameter {name!r} has shape {tuple(np.shape(value))}, expected {tuple(spec.shape)}."
            )
        dtype = np.dtype(getattr(value, "dtype", None) or np.asarray(value).dtype)
        if dtype != np.dtype(spec.dtype):
            if not (np.issubdtype(dtype, np.floating) or dtype.name == "bfloat16"):
                raise CheckpointError(f"{source}: parameter {name!r} has dtype {dtype}, expected {np.dtype(spec.dtype)}.")
            value = np.asarray(value).astype(spec.dtype)
        result[name] = value
    return traverse_util.unflatten_dict(result, sep="/")


def _shapes(module, *example_inputs):
    """Parameter shapes of `module` without allocating them (jax.eval_shape)."""
    init = lambda *inputs: module.init(jax.random.PRNGKey(0), *inputs)["params"]  # noqa: E731
    return _unfreeze(jax.eval_shape(init, *example_inputs))


# ---------------------------------------------------------------------------------------------
# DalleBart


def _dalle_bart_example_inputs(config: DalleBartConfig):
    text = jax.ShapeDtypeStruct((1, config.max_text_length), jnp.int32)
    image = jax.ShapeDtypeStruct((1, config.image_length), jnp.int32)
    return text, text, image


def dalle_bart_param_shapes(config: dict):
    """Parameter tree (jax.ShapeDtypeStruct leaves) of the DalleBart an upstream config.json dict describes."""
    module = DalleBart(DalleBartConfig.from_dict(config))
    return _shapes(module, *_dalle_bart_example_inputs(module.config))


def _stack_unscanned_layers(tree: dict, source) -> dict:
    """Turn `layers/FlaxBartEncoderLayer_{i}/...` into scanned `layers/FlaxBartEncoderLayers/...` [L, ...]."""
    model = tree.get("model", {})
    for side in ("encoder", "decoder"):
        layers = model.get(side, {}).get("layers")
        if not isinstance(layers, dict) or _SCANNED_LAYER_NAMES[side] in layers:
            continue
        prefix = _UNSCANNED_LAYER_NAMES[side] + "_"
        indices = sorted(int(key[len(prefix):]) for key in layers if key.startswith(prefix) and key[len(prefix):].isdigit())
        if not indices:
            continue
        if indices != list(range(len(indices))):
            missing = sorted(set(range(indices[-1] + 1)) - set(indices))
            raise CheckpointError(f"{source}: missing parameter 'model/{side}/layers/{prefix}{missing[0]}'.")
        per_layer = [layers[f"{prefix}{i}"] for i in indices]
        try:
            stacked = jax.tree_util.tree_map(lambda *xs: np.stack(xs), *per_layer)
        except ValueError as error:
            raise CheckpointError(f"{source}: the {side} layers do not share one parameter structure ({error}).") from None
        model[side]["layers"] = {_SCANNED_LAYER_NAMES[side]: stacked}
    return tree


def load_dalle_bart(path_or_repo, revision=None):
    """(DalleBart module, params) from a folder or hub repo holding config.json + flax_model.msgpack."""
    folder = resolve_folder(path_or_repo, revision)
    config = DalleBartConfig.from_dict(read_config(folder))
    module = DalleBart(config)
    file = folder / FLAX_WEIGHTS
    loaded = _stack_unscanned_layers(read_msgpack(file), file)
    expected = _shapes(module, *_dalle_bart_example_inputs(config))
    return module, jax.tree_util.tree_map(jnp.asarray, validate_params(expected, loaded, file))


def save_dalle_bart(folder, module_or_config, params) -> Path:
    """config.json + flax_model.msgpack (scanned layers), as the published repos hold them."""
    return _save_flax_folder(folder, module_or_config, params)


# ---------------------------------------------------------------------------------------------
# VQGAN


def _vqgan_example_inputs(config: VQGANConfig):
    return (jax.ShapeDtypeStruct((1, config.resolution, config.resolution, config.in_channels), jnp.float32),)


def load_vqgan(path_or_repo, revision=None):
    """(VQGAN module, params) from a folder or hub repo holding config.json + flax_model.msgpack."""
    folder = resolve_folder(path_or_repo, revision)
    config = VQGANConfig.from_dict(read_config(folder))
    module = VQGAN(config)
    file = folder / FLAX_WEIGHTS
    expected = _shapes(module, *_vqgan_example_inputs(config))
    return module, jax.tree_util.tree_map(jnp.asarray, validate_params(expected, read_msgpack(file), file))


def save_vqgan(folder, module_or_config, params) -> Path:
    """config.json + flax_model.msgpack, as vqgan-jax writes them."""
    return _save_flax_folder(folder, module_or_config, params)


# ---------------------------------------------------------------------------------------------
# CLIP


def _clip_example_inputs(config: CLIPConfig):
    text = jax.ShapeDtypeStruct((1, config.text_config.max_position_embeddings), jnp.int32)
    size = config.vision_config.image_size
    pixels = jax.ShapeDtypeStruct((1, size, size, config.vision_config.num_channels), jnp.float32)
    return text, pixels, text


def load_clip(path_or_repo, revision=None):
    """(CLIP module, params) from flax_model.msgpack or, failing that, model.safetensors. Never unpickles."""
    folder = resolve_folder(path_or_repo, revision, allow_patterns=[CONFIG_FILE, FLAX_WEIGHTS, SAFETENSORS_WEIGHTS, "*.txt", "*.json"])
    config = CLIPConfig.from_dict(read_config(folder))
    module = CLIP(config)
    expected = _shapes(module, *_clip_example_inputs(config))
    if (folder / FLAX_WEIGHTS).is_file():
        file = folder / FLAX_WEIGHTS
        loaded = read_msgpack(file)
    elif (folder / SAFETENSORS_WEIGHTS).is_file():
        file = folder / SAFETENSORS_WEIGHTS
        state = read_safetensors(file)
        try:
            loaded = params_from_torch_state_dict(state, config)
        except KeyError as error:
            raise CheckpointError(f"{file}: missing parameter {error.args[0]!r}.") from None
        except ValueError as error:
            raise CheckpointError(f"{file}: {error}") from None
    elif (folder / PICKLED_WEIGHTS).is_file():
        raise CheckpointError(
            f"{folder} holds only {PICKLED_WEIGHTS}, a pickle, which this project never loads. Convert it to "
            f"{SAFETENSORS_WEIGHTS} (e.g. transformers' save_pretrained(safe_serialization=True)) and retry."
        )
    else:
        raise CheckpointError(f"Missing weights in {folder}: expected {FLAX_WEIGHTS} or {SAFETENSORS_WEIGHTS}.")
    return module, jax.tree_util.tree_map(jnp.asarray, validate_params(expected, loaded, file))


def save_clip(folder, module_or_config, params) -> Path:
    """Writes config.json + model.safetensors with PyTorch names, so transformers' CLIPModel reads it too."""
    from safetensors.numpy import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    write_config(folder, _config_of(module_or_config).to_dict())
    save_file(params_to_torch_state_dict(params), str(folder / SAFETENSORS_WEIGHTS), metadata={"format": "pt"})
    return folder


def _save_flax_folder(folder, module_or_config, params) -> Path:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    write_config(folder, _config_of(module_or_config).to_dict())
    write_msgpack(folder / FLAX_WEIGHTS, params)
    return folder


def _config_of(module_or_config):
    return getattr(module_or_config, "config", module_or_config)
