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
EMBEDDED_NAME = "emoji"  # what load_pipeline and the app's model choice call the embedded model
PIPELINE_FILE = "pipeline.json"

# Published models: (hub repo, revision) per stage, each pinned to a commit so that a load gets the
# files the loaders were written and tested for. Where each commit id comes from:
# - dalle-mini/dalle-mini bad05d391acb8c5a48f8b25e6f38613d92b60ee6: the Hub's file listing at that
#   commit (huggingface.co/dalle-mini/dalle-mini/tree/bad05d3...): flax_model.msgpack 1.75 GB "push
#   wandb artif dalle-mini/dalle-mini/mini-1:v0", the mini-1:v0 the inference notebook loads.
# - dalle-mini/dalle-mega f815ffa5bdab671dfdb6aa4e0f749b7228dc8d9a: the Hub's file listing at that
#   commit (huggingface.co/dalle-mini/dalle-mega/tree/f815ffa...): flax_model.msgpack 10.4 GB "Push
#   wandb artifact dalle-mini/dalle-mini/mega-1:v16".
# - dalle-mini/vqgan_imagenet_f16_16384 e93a26e7707683d349bf5d5c41c5b0ef69b677a9: VQGAN_COMMIT_ID of
#   dalle-mini's inference notebook (tools/inference/inference_pipeline.ipynb).
# - openai/clip-vit-base-patch32 3d74acf9a28c67741b2f4f2ea7635f0aaf6f0268: the revision public projects
#   pin for this repo (CLIPModel.from_pretrained(..., revision=...)) and hold in their hub caches.
# The README's front matter preloads the same files at the same commits on the Space (tests/test_hub_cache.py).
MINI = ("dalle-mini/dalle-mini", "bad05d391acb8c5a48f8b25e6f38613d92b60ee6")
MEGA = ("dalle-mini/dalle-mega", "f815ffa5bdab671dfdb6aa4e0f749b7228dc8d9a")
VQGAN = ("dalle-mini/vqgan_imagenet_f16_16384", "e93a26e7707683d349bf5d5c41c5b0ef69b677a9")
CLIP = ("openai/clip-vit-base-patch32", "3d74acf9a28c67741b2f4f2ea7635f0aaf6f0268")
PRESETS = {
    "mini": {"bart": MINI, "vqgan": VQGAN, "clip": CLIP},
    "mega": {"bart": MEGA, "vqgan": VQGAN, "clip": CLIP},
}
# The files a load reads from each stage's repo (and all it fetches: not the README, nor CLIP's
# PyTorch and TensorFlow weights). The first two must be there; the loaders check the others.
_TOKENIZER = ("vocab.json", "merges.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
HUB_FILES = {
    "bart": ("config.json", "flax_model.msgpack", *_TOKENIZER, "enwiki-words-frequency.txt"),
    "vqgan": ("config.json", "flax_model.msgpack"),
    "clip": ("config.json", "flax_model.msgpack", *_TOKENIZER, "preprocessor_config.json"),
}
_REQUIRED = 2
STAGE_NAMES = {"bart": "DalleBart", "vqgan": "VQGAN", "clip": "CLIP"}


def load_pipeline(name_or_path=None, mesh=None, compilation_cache=True, dtype=None, progress=None) -> Pipeline:
    """The embedded emoji model (no argument), a published preset ("mini", "mega") or a folder with
    bart/, vqgan/, clip/ sub-folders (and optionally pipeline.json with defaults).

    `mesh`: a `jax.sharding.Mesh` (see `model.sharding.make_mesh`) to spread rows, and optionally
    DalleBart's weights, over several devices; None uses one device.
    `compilation_cache`: turn on JAX's persistent compilation cache (see enable_compilation_cache).
    `dtype`: "float32", "bfloat16" or "float16" (or a numpy/jnp dtype), the precision the weights are
    stored in on the device; None picks one for the device (`default_dtype`). Norms, softmax, the
    logits the sampler reads and the VQGAN's and CLIP's math stay float32 (docs/precision.md).
    A model that will not fit the device's free memory is refused before its weights are read.
    `progress`: called with a line per step ("Loading mini: DalleBart (1/3) ..."), e.g. `print`.
    """
    say = progress or (lambda message: None)
    dtype = resolve_dtype(dtype, jax.devices()[0] if mesh is None else mesh.devices.flat[0])
    if compilation_cache:
        enable_compilation_cache()
    if name_or_path is None or name_or_path == EMBEDDED_NAME:
        if not (EMBEDDED_MODEL / "bart" / "config.json").is_file():
            raise CheckpointError(f"The embedded model is missing: {EMBEDDED_MODEL} holds no bart/config.json.")
        name_or_path = EMBEDDED_MODEL
    if isinstance(name_or_path, str) and name_or_path in PRESETS:
        say(f"Loading {name_or_path}: its files, from the local hub cache or downloaded ...")
        preset = PRESETS[name_or_path]
        folders = {stage: _hub_folder(stage, repo, revision) for stage, (repo, revision) in preset.items()}
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
    say(f"Loading {name}: {STAGE_NAMES['bart']} (1/3) ...")
    bart, bart_params = load_dalle_bart(folders["bart"], dtype=dtype)
    # Only the decoding layout is kept, so the decoder's weights are in memory once. Building it copies
    # the decoder while the loaded stack still exists: built before the other stages load, that copy
    # stays below the memory the loaded pipeline holds.
    bart_params = bart_decode.decoding_params(sharding.place_params(bart_params, mesh, model_parallel_rules=True))
    say(f"Loading {name}: {STAGE_NAMES['vqgan']} (2/3) ...")
    vqgan, vqgan_params = load_vqgan(folders["vqgan"], dtype=dtype)
    say(f"Loading {name}: {STAGE_NAMES['clip']} (3/3) ...")
    clip, clip_params = load_clip(folders["clip"], dtype=dtype)
    word_file = folders["bart"] / "enwiki-words-frequency.txt"
    normalizer = TextNormalizer(word_file if word_file.is_file() else None) if bart.config.normalize_text else None
    size, mean, std = _clip_preprocessing(folders["clip"], clip.config)
    reranker = Reranker(clip, clip_params, load_clip_tokenizer(folders["clip"]), image_size=size, mean=mean,
                        std=std, mesh=mesh)
    pipeline = Pipeline(
        bart=bart, bart_params=bart_params, bart_tokenizer=load_bart_tokenizer(folders["bart"]),
        vqgan=vqgan, vqgan_params=vqgan_params, reranker=reranker, normalizer=normalizer,
        reader=prompt_reader(info), backdrop=prompt_reader(info, "backdrop"), defaults=defaults, name=name,
        info=info, mesh=mesh, dtype=dtype,
    )
    del bart_params, clip_params
    gc.collect()
    return_freed_memory()
    return pipeline


def prompt_reader(info: dict, part: str = "read"):
    """The prompt reader a pipeline.json names ("prompt_reader"), or None: the prompt is read as written.
    part "backdrop": its picture for a prompt that names nothing the model knows (see Pipeline)."""
    name = info.get("prompt_reader")
    if name is None:
        return None
    if name != "emoji-scenes":
        raise CheckpointError(f"pipeline.json names an unknown prompt_reader {name!r}; known: 'emoji-scenes'.")
    from model.data import reading  # the scene vocabulary: only models that use it load it

    return getattr(reading, part)


def _hub_folder(stage: str, repo: str, revision: str) -> Path:
    """The snapshot folder of a preset's stage, holding at least its config and weights."""
    folder = resolve_folder(repo, revision, allow_patterns=list(HUB_FILES[stage]))
    for file in HUB_FILES[stage][:_REQUIRED]:
        if not (folder / file).is_file():
            # Offline, huggingface_hub returns a cached snapshot folder as it is, even incomplete.
            raise CheckpointError(f"Hub repo {repo!r} (revision {revision}) is incomplete in the local hub cache: "
                                  f"{folder} has no {file}. Download it again with hub access "
                                  f"(`hf download {repo} --revision {revision}`).")
    return folder


def in_hub_cache(name: str) -> bool:
    """Whether a preset's configs and weights are all in the local hub cache at its pinned revisions
    (e.g. preloaded on a Space). Asks no network; False for names other than presets."""
    if name not in PRESETS:
        return False
    from huggingface_hub import try_to_load_from_cache

    return all(isinstance(try_to_load_from_cache(repo, file, revision=revision), str)
               for stage, (repo, revision) in PRESETS[name].items() for file in HUB_FILES[stage][:_REQUIRED])


def cached_or_online(name: str) -> bool:
    """Whether a preset can load here: its files are in the local hub cache, or the hub may be asked
    (HF_HUB_OFFLINE is off). Asks no network; names other than presets count as loadable."""
    if name not in PRESETS:
        return True
    from huggingface_hub import constants

    return not constants.HF_HUB_OFFLINE or in_hub_cache(name)


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
