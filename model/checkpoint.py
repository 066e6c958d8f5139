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

import io
import json
import re
from pathlib import Path

import jax
import jax.numpy as jnp
import msgpack
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

    where = f"Hub repo {path_or_repo!r} (revision {revision or 'main'})"
    try:
        return Path(snapshot_download(str(path_or_repo), revision=revision, allow_patterns=allow_patterns))
    except (RepositoryNotFoundError, RevisionNotFoundError, GatedRepoError) as error:
        raise CheckpointError(f"{where} is not available: {' '.join(str(error).split())}") from None
    except (LocalEntryNotFoundError, OSError) as error:  # IncompleteSnapshotError too: a partial download
        raise CheckpointError(
            f"{where} is not in the local hub cache, or only partly ({type(error).__name__}), and cannot be "
            "downloaded: the hub is unreachable from this machine or offline mode is on (HF_HUB_OFFLINE). "
            f"Download it on a machine with access (`hf download {path_or_repo} --revision {revision or 'main'} "
            "--local-dir FOLDER`) and pass that local folder instead."
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
    """A nested dict of numpy arrays from a flax msgpack file; corrupt files become CheckpointError.

    Decodes what flax's `msgpack_restore` decodes, but streams the file, reading each array's data as
    one bytes object that the array views. `msgpack_restore` takes the whole file as bytes and copies
    the arrays out of it: for mini's 1.6 GiB DalleBart it peaked at 3.4 GiB, and took 2-3x as long.
    """
    if not file.is_file():
        raise CheckpointError(f"Missing {file}: the folder holds no {file.name}.")
    try:
        with file.open("rb") as stream:
            tree = _read_msgpack_value(stream)
            if stream.read(1):
                raise ValueError("extra data after the parameter tree")
        tree = serialization._unchunk_array_leaves_in_place(tree)
    except Exception as error:  # msgpack raises several unrelated types on truncated or foreign data
        raise CheckpointError(f"{file} is not a readable flax msgpack file ({type(error).__name__}: {error}).") from None
    if not isinstance(tree, dict):
        raise CheckpointError(f"{file} does not hold a parameter tree.")
    return tree


# The msgpack headers read_msgpack parses itself (type byte -> bytes of the size that follows): flax
# writes maps with str keys whose leaves are ext values, an ndarray being ext type 1 holding the
# msgpack array [shape, dtype name, bin data]. Anything else is a small object left to msgpack, and
# other ext types to flax's own decoder.
_MAP_SIZE = {0xDE: 2, 0xDF: 4}
_STR_SIZE = {0xD9: 1, 0xDA: 2, 0xDB: 4}
_BIN_SIZE = {0xC4: 1, 0xC5: 2, 0xC6: 4}
_EXT_SIZE = {0xC7: 1, 0xC8: 2, 0xC9: 4}
_FIXEXT_LENGTH = {0xD4: 1, 0xD5: 2, 0xD6: 4, 0xD7: 8, 0xD8: 16}


def _read_exactly(stream, size: int) -> bytes:
    data = stream.read(size)
    if len(data) != size:
        raise EOFError("the file is truncated")
    return data


def _read_size(stream, size_bytes: int) -> int:
    return int.from_bytes(_read_exactly(stream, size_bytes), "big")


def _read_msgpack_value(stream):
    """The next value of a flax msgpack stream, decoded as `serialization.msgpack_restore` does."""
    kind = _read_exactly(stream, 1)[0]
    if 0x80 <= kind <= 0x8F or kind in _MAP_SIZE:
        size = kind - 0x80 if kind <= 0x8F else _read_size(stream, _MAP_SIZE[kind])
        return {_read_msgpack_value(stream): _read_msgpack_value(stream) for _ in range(size)}
    if 0xA0 <= kind <= 0xBF or kind in _STR_SIZE:
        size = kind - 0xA0 if kind <= 0xBF else _read_size(stream, _STR_SIZE[kind])
        return _read_exactly(stream, size).decode()
    if kind in _FIXEXT_LENGTH or kind in _EXT_SIZE:
        size = _FIXEXT_LENGTH[kind] if kind in _FIXEXT_LENGTH else _read_size(stream, _EXT_SIZE[kind])
        code = int.from_bytes(_read_exactly(stream, 1), "big", signed=True)
        if code == serialization._MsgpackExtType.ndarray:
            return _read_ndarray(stream, size)
        return serialization._msgpack_ext_unpack(code, _read_exactly(stream, size))
    stream.seek(-1, io.SEEK_CUR)
    start = stream.tell()
    unpacker = msgpack.Unpacker(stream, read_size=256, raw=False, strict_map_key=False,
                                ext_hook=serialization._msgpack_ext_unpack)
    value = unpacker.unpack()
    stream.seek(start + unpacker.tell())  # the unpacker reads ahead
    return value


def _read_ndarray(stream, size: int) -> np.ndarray:
    """The ndarray in the next `size` bytes (an ext value's data): read-only over its bytes, as flax's
    decoder returns it."""
    end = stream.tell() + size
    if _read_exactly(stream, 1) != b"\x93":
        raise ValueError("an ndarray ext value does not hold [shape, dtype, data]")
    shape = _read_msgpack_value(stream)
    dtype = serialization._dtype_from_name(_read_msgpack_value(stream).encode())  # flax reads the name raw
    kind = _read_exactly(stream, 1)[0]
    if kind not in _BIN_SIZE:
        raise ValueError("an ndarray ext value does not hold bin data")
    data_size = _read_size(stream, _BIN_SIZE[kind])
    if stream.tell() + data_size != end:
        raise ValueError("an ndarray's data does not fill its ext value")
    return np.frombuffer(_read_exactly(stream, data_size), dtype).reshape(shape)


def read_safetensors(file: Path) -> dict:
    from safetensors.numpy import load_file

    try:
        # pread, not the default mmap: the mapped file's pages count as resident memory while it is
        # open (0.56 GiB for CLIP ViT-B/32, on top of the arrays copied out of it).
        return load_file(str(file), backend="pread")
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


def _to_device(params: dict, dtype=None) -> dict:
    """`params` as jax arrays, emptying `params` as it goes: each host array is dropped as soon as its
    device copy exists, so the weights are not in memory twice. The caller must hold no other
    reference to the host arrays. `dtype` (e.g. bfloat16): weight matrices are cast on the host,
    one at a time, before they are placed (see `cast_weight`).

    A transfer is asynchronous and holds its host array until it is done, so each one is awaited:
    queued all at once (tree_map(jnp.asarray)), mini's DalleBart was held twice (3.3 GiB).
    """
    placed = {}
    for name in list(params):
        value = params.pop(name)
        placed[name] = (_to_device(value, dtype) if isinstance(value, dict)
                        else jax.block_until_ready(jnp.asarray(cast_weight(value, dtype))))
    return placed


def cast_weight(value, dtype):
    """A floating array of 2+ axes (kernels, embeddings: nearly all the bytes) in `dtype`; vectors
    (norm scales and biases, conv biases) stay float32, as the float32 math that reads them."""
    if dtype is None or np.ndim(value) < 2 or not np.issubdtype(np.asarray(value).dtype, np.floating):
        return value
    return np.asarray(value).astype(dtype)


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
        # A layer that is not a dict holds no parameters here; validation then names what is missing.
        per_layer = [traverse_util.flatten_dict(layer) if isinstance(layer, dict) else {}
                     for layer in (layers.pop(f"{prefix}{i}") for i in indices)]
        names = sorted(per_layer[0])
        try:
            if any(sorted(layer) != names for layer in per_layer):
                raise ValueError("their parameter names differ")
            # Parameter by parameter, dropping the layers' arrays once stacked: the stacking copies one
            # parameter at a time instead of the whole side (0.7 GiB for mini's decoder).
            stacked = {name: np.stack([layer.pop(name) for layer in per_layer]) for name in names}
        except ValueError as error:
            raise CheckpointError(f"{source}: the {side} layers do not share one parameter structure ({error}).") from None
        model[side]["layers"] = {_SCANNED_LAYER_NAMES[side]: traverse_util.unflatten_dict(stacked)}
    return tree


def load_dalle_bart(path_or_repo, revision=None, dtype=None):
    """(DalleBart module, params) from a folder or hub repo holding config.json + flax_model.msgpack;
    weight matrices in `dtype` (None: as validated, float32)."""
    folder = resolve_folder(path_or_repo, revision)
    config = DalleBartConfig.from_dict(read_config(folder))
    module = DalleBart(config)
    file = folder / FLAX_WEIGHTS
    loaded = _stack_unscanned_layers(read_msgpack(file), file)
    params = validate_params(_shapes(module, *_dalle_bart_example_inputs(config)), loaded, file)
    del loaded  # the host arrays live on in `params` alone, for _to_device to release one by one
    return module, _to_device(params, dtype)


def save_dalle_bart(folder, module_or_config, params) -> Path:
    """config.json + flax_model.msgpack (scanned layers), as the published repos hold them."""
    return _save_flax_folder(folder, module_or_config, params)


# ---------------------------------------------------------------------------------------------
# VQGAN


def _vqgan_example_inputs(config: VQGANConfig):
    return (jax.ShapeDtypeStruct((1, config.resolution, config.resolution, config.in_channels), jnp.float32),)


def load_vqgan(path_or_repo, revision=None, dtype=None):
    """(VQGAN module, params) from a folder or hub repo holding config.json + flax_model.msgpack."""
    folder = resolve_folder(path_or_repo, revision)
    config = VQGANConfig.from_dict(read_config(folder))
    module = VQGAN(config)
    file = folder / FLAX_WEIGHTS
    expected = _shapes(module, *_vqgan_example_inputs(config))
    return module, _to_device(validate_params(expected, read_msgpack(file), file), dtype)


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


def load_clip(path_or_repo, revision=None, dtype=None):
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
        del state  # its arrays live on in `loaded` alone (as views), for _to_device to release
    elif (folder / PICKLED_WEIGHTS).is_file():
        raise CheckpointError(
            f"{folder} holds only {PICKLED_WEIGHTS}, a pickle, which this project never loads. Convert it to "
            f"{SAFETENSORS_WEIGHTS} (e.g. transformers' save_pretrained(safe_serialization=True)) and retry."
        )
    else:
        raise CheckpointError(f"Missing weights in {folder}: expected {FLAX_WEIGHTS} or {SAFETENSORS_WEIGHTS}.")
    params = validate_params(expected, loaded, file)
    del loaded  # as in load_dalle_bart
    return module, _to_device(params, dtype)


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
