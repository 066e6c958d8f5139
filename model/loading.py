"""Loading a whole pipeline: the embedded model, a published preset or a folder -> `Pipeline`.

    load_pipeline()                 # checkpoints/emoji, offline
    load_pipeline("mini")           # dalle-mini + VQGAN + CLIP from the hub (or its local cache)
    load_pipeline("path/to/folder") # bart/, vqgan/, clip/ and optionally pipeline.json

The per-stage loaders (folders and hub repos -> module and parameters, checked parameter by
parameter) are in model/checkpoint.py; this file puts the stages together: presets, pipeline.json,
tokenizers, CLIP preprocessing, and the order of loading that keeps memory low.
"""

import gc
import json
import os
from pathlib import Path

import jax
import jax.numpy as jnp

from model import bart_decode, memory, sharding
from model.bart import DalleBartConfig
from model.checkpoint import load_clip, load_dalle_bart, load_vqgan, read_config, resolve_folder
from model.clip import CLIPConfig
from model.clip_rank import Reranker
from model.errors import CheckpointError, InvalidInputError
from model.vqgan import VQGANConfig
from model.options import Options
from model.pipeline import Pipeline, return_freed_memory
from model.text import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, TextNormalizer, load_bart_tokenizer, load_clip_tokenizer

EMBEDDED_MODEL = Path(__file__).resolve().parent.parent / "checkpoints" / "emoji"
PIPELINE_FILE = "pipeline.json"

# Published models: (hub repo, revision) per stage. Revisions pin what the loaders were written for;
# the VQGAN revision is the one the dalle-mini inference notebook pins.
PRESETS = {
    "mini": {
        "bart": ("dalle-mini/dalle-mini", None),
        "vqgan": ("dalle-mini/vqgan_imagenet_f16_16384", "e93a26e7707683d349bf5d5c41c5b0ef69b677a9"),
        "clip": ("openai/clip-vit-base-patch32", None),
    },
    "mega": {
        "bart": ("dalle-mini/dalle-mega", None),
        "vqgan": ("dalle-mini/vqgan_imagenet_f16_16384", "e93a26e7707683d349bf5d5c41c5b0ef69b677a9"),
        "clip": ("openai/clip-vit-base-patch32", None),
    },
}


def load_pipeline(name_or_path=None, mesh=None, compilation_cache=True, dtype=None) -> Pipeline:
    """The embedded emoji model (no argument), a published preset ("mini", "mega") or a folder with
    bart/, vqgan/, clip/ sub-folders (and optionally pipeline.json with defaults).

    `mesh`: a `jax.sharding.Mesh` (see `model.sharding.make_mesh`) to spread rows, and optionally
    DalleBart's weights, over several devices; None uses one device.
    `compilation_cache`: turn on JAX's persistent compilation cache (see enable_compilation_cache).
    `dtype`: "float32", "bfloat16" or "float16" (or a numpy/jnp dtype), the precision the weights are
    stored in on the device; None picks one for the device (`default_dtype`). Norms, softmax, the
    logits the sampler reads and the VQGAN's and CLIP's math stay float32 (docs/precision.md).
    A model that will not fit the device's free memory is refused before its weights are read.
    """
    dtype = resolve_dtype(dtype, jax.devices()[0] if mesh is None else mesh.devices.flat[0])
    if compilation_cache:
        enable_compilation_cache()
    if name_or_path is None:
        if not (EMBEDDED_MODEL / "bart" / "config.json").is_file():
            raise CheckpointError(f"The embedded model is missing: {EMBEDDED_MODEL} holds no bart/config.json.")
        name_or_path = EMBEDDED_MODEL
    if isinstance(name_or_path, str) and name_or_path in PRESETS:
        preset = PRESETS[name_or_path]
        folders = {stage: resolve_folder(repo, revision) for stage, (repo, revision) in preset.items()}
        info, name = {"name": name_or_path}, name_or_path
    else:
        root = Path(name_or_path)
        if not root.is_dir():
            raise CheckpointError(f"No model folder at {root}; give a folder with bart/, vqgan/ and clip/, "
                                  f"or one of {sorted(PRESETS)}.")
        folders = {stage: root / stage for stage in ("bart", "vqgan", "clip")}
        for stage, folder in folders.items():
            if not folder.is_dir():
                raise CheckpointError(f"{root} has no {stage}/ sub-folder.")
        info = _read_pipeline_file(root)
        name = info.get("name", root.name)

    defaults = _defaults(info, root=folders["bart"].parent)
    if mesh is None:
        check_fits(folders, dtype, defaults, name, jax.devices()[0])
    bart, bart_params = load_dalle_bart(folders["bart"], dtype=dtype)
    # Only the decoding layout is kept, so the decoder's weights are in memory once. Building it copies
    # the decoder while the loaded stack still exists: built before the other stages load, that copy
    # stays below the memory the loaded pipeline holds.
    bart_params = bart_decode.decoding_params(sharding.place_params(bart_params, mesh, model_parallel_rules=True))
    vqgan, vqgan_params = load_vqgan(folders["vqgan"], dtype=dtype)
    clip, clip_params = load_clip(folders["clip"], dtype=dtype)
    word_file = folders["bart"] / "enwiki-words-frequency.txt"
    normalizer = TextNormalizer(word_file if word_file.is_file() else None) if bart.config.normalize_text else None
    size, mean, std = _clip_preprocessing(folders["clip"], clip.config)
    reranker = Reranker(clip, clip_params, load_clip_tokenizer(folders["clip"]), image_size=size, mean=mean,
                        std=std, mesh=mesh)
    pipeline = Pipeline(
        bart=bart, bart_params=bart_params, bart_tokenizer=load_bart_tokenizer(folders["bart"]),
        vqgan=vqgan, vqgan_params=vqgan_params, reranker=reranker, normalizer=normalizer,
        defaults=defaults, name=name, info=info, mesh=mesh, dtype=dtype,
    )
    del bart_params, clip_params
    gc.collect()
    return_freed_memory()
    return pipeline


def cached_or_online(name: str) -> bool:
    """Whether a preset can load here: its files are in the local hub cache, or the hub may be asked
    (HF_HUB_OFFLINE is off). Asks no network; names other than presets count as loadable."""
    if name not in PRESETS:
        return True
    from huggingface_hub import constants, try_to_load_from_cache

    if not constants.HF_HUB_OFFLINE:
        return True
    return all(isinstance(try_to_load_from_cache(repo, "config.json", revision=revision), str)
               for repo, revision in PRESETS[name].values())


DTYPES = ("float32", "bfloat16", "float16")


def default_dtype(platform: str, compute_capability=None) -> str:
    """The weights' precision for a device: float32 on CPU (where half precision decoded ~3x slower),
    bfloat16 on TPU and on NVIDIA GPUs of compute capability >= 8.0 (A10G, L4, A100, H100), float16
    on older GPUs (T4: 7.5), which have float16 but no bfloat16 arithmetic. Pure: tests pass
    fake devices' descriptions."""
    if platform == "tpu":
        return "bfloat16"
    if platform in ("gpu", "cuda", "rocm"):
        try:
            major = int(str(compute_capability).split(".")[0])
        except ValueError:  # unknown (or a ROCm gfx name): float16 runs everywhere
            return "float16"
        return "bfloat16" if major >= 8 else "float16"
    return "float32"


def resolve_dtype(dtype, device=None) -> str:
    """`dtype` given (a name, numpy or jnp dtype) checked, or None -> `default_dtype` of `device`."""
    if dtype is None:
        device = device or jax.devices()[0]
        return default_dtype(device.platform, getattr(device, "compute_capability", None))
    try:
        name = jnp.dtype(dtype).name
    except TypeError:
        name = None
    if name not in DTYPES:
        raise InvalidInputError(f"dtype {dtype!r} is not supported; use one of {', '.join(DTYPES)}.")
    return name


def check_fits(folders: dict, dtype: str, defaults: Options, name: str, device) -> None:
    """CheckpointError, before any weight is read, when the model's weights, KV cache and largest
    temporaries (model.memory, bounded from the configs) exceed the device's free memory. Skipped where
    the device reports none (the CPU)."""
    stats = device.memory_stats() if hasattr(device, "memory_stats") else None
    if not stats or "bytes_limit" not in stats:
        return
    free = stats["bytes_limit"] - stats.get("bytes_in_use", 0)
    configs = (DalleBartConfig.from_dict(read_config(folders["bart"])), VQGANConfig.from_dict(read_config(folders["vqgan"])),
               CLIPConfig.from_dict(read_config(folders["clip"])))
    resolved = defaults.resolved()
    need = memory.estimate(*configs, dtype, images=resolved.candidates, guidance=resolved.condition_scale != 1.0,
                           measure=False).total
    if need > free:
        images = "a 3x3 grid" if resolved.candidates == 9 else f"{resolved.candidates} images"
        raise CheckpointError(f"{name} at {dtype} needs ~{need / memory.GB:.1f} GB for {images}; this "
                              f"{device.platform.upper()} has {free / memory.GB:.1f} GB free.")


def _defaults(info: dict, root: Path) -> Options:
    try:
        return Options.from_dict(info.get("defaults", {}))
    except ValueError as error:  # InvalidInputError: a default out of range
        raise CheckpointError(f"{root / PIPELINE_FILE}: bad default: {error}") from None


def _read_pipeline_file(folder: Path) -> dict:
    file = folder / PIPELINE_FILE
    if not file.is_file():
        return {}
    try:
        return json.loads(file.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise CheckpointError(f"{file} is not valid JSON: {error}") from None


def _clip_preprocessing(folder: Path, clip_config) -> tuple[int, tuple, tuple]:
    """Image size, mean and std from a preprocessor_config.json, else OpenAI's for the config's size."""
    file = folder / "preprocessor_config.json"
    if not file.is_file():
        return clip_config.vision_config.image_size, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
    d = json.loads(file.read_text(encoding="utf-8"))
    size = d.get("crop_size", clip_config.vision_config.image_size)
    size = size.get("height", clip_config.vision_config.image_size) if isinstance(size, dict) else size
    return int(size), tuple(d.get("image_mean", OPENAI_CLIP_MEAN)), tuple(d.get("image_std", OPENAI_CLIP_STD))


def default_compilation_cache() -> Path:
    """$XDG_CACHE_HOME/dalle-flax/jax (~/.cache/dalle-flax/jax)."""
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "dalle-flax" / "jax"


def enable_compilation_cache(folder=None) -> Path:
    """Turns on JAX's persistent compilation cache (start-up in seconds instead of recompiling)."""
    folder = Path(folder or default_compilation_cache())
    folder.mkdir(parents=True, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", str(folder))
    # Cache every compile: the decode loop is small to compile but paid at each start otherwise.
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    return folder
