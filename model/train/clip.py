"""Train the CLIP reranker contrastively on rendered scenes and their captions.

    python -m model.train.clip --out runs/clip          # default config below, ~10-15 min on 2 CPU cores

Loss: symmetric InfoNCE over the batch (each caption against every image and back) with a learned
temperature, `logit_scale`, capped at log(100) as in CLIP.

Tokenizer: a byte-level BPE trained here on scene captions, lowercasing its input, with
`<|startoftext|>` first and `<|endoftext|>` as the LAST id; rows are padded with `<|endoftext|>`.
The text config's eos_token_id names that id, so the text tower pools at the first end token (HF's
rule; with eos_token_id == 2 it would pool at argmax(input_ids) instead, which is why the BART
tokenizer, whose `</s>` is 2, is not reused). Saved so `AutoTokenizer.from_pretrained` loads it.

Images: 64x64 scenes normalized with mean 0.5, std 0.25 per channel (preprocessor_config.json).

Default model (~1.1 M parameters, ~4.5 MB): both towers width 128, 4 heads, MLP 512; text 2 layers
and 32 positions, vision 3 layers on 8x8 patches; embeddings of 128. AdamW 5e-4, batch 128.
"""

import argparse
import functools
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from PIL import Image

from model.checkpoint import save_clip
from model.clip import CLIP, CLIPConfig
from model.data import scenes
from model.text import clip_preprocess, clip_tokenize
from model.train.loop import LoopConfig, Task, add_loop_arguments, loop_config, train_from_args

IMAGE_MEAN = (0.5, 0.5, 0.5)
IMAGE_STD = (0.25, 0.25, 0.25)
MAX_LOGIT_SCALE = float(np.log(100.0))
START, END = "<|startoftext|>", "<|endoftext|>"
EVAL_SPLITS = ("heldout_pairs", "heldout_backgrounds", "heldout_positions", "heldout_counts")


def train_clip_tokenizer(texts, vocab_size: int, folder):
    """A byte-level BPE with START at id 0 and END at the last id; saved in `folder`, returned as AutoTokenizer reads it."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.normalizer = normalizers.Lowercase()
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size - 1, special_tokens=[START],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    bpe.train_from_iterator(texts, trainer)
    bpe.add_special_tokens([END])  # appended after training: the last id
    end_id = bpe.token_to_id(END)
    bpe.post_processor = processors.TemplateProcessing(single=f"{START} $A {END}",
                                                       special_tokens=[(START, 0), (END, end_id)])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token=START, eos_token=END, pad_token=END)
    tokenizer.model_max_length = 10**6  # truncation is explicit (clip_tokenize's max_length)
    folder = Path(folder)
    tokenizer.save_pretrained(str(folder))
    loaded = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    if loaded.eos_token_id != len(loaded) - 1 or loaded.pad_token_id != loaded.eos_token_id:
        raise AssertionError(f"CLIP tokenizer: end id {loaded.eos_token_id} must be the last of {len(loaded)}")
    return loaded


def name_token_ids(config_file: Path, tokenizer) -> None:
    """Writes the tokenizer's start/end/pad ids into config.json's text_config; otherwise transformers
    fills in OpenAI's (49406, 49407, 1) when it reads the folder, and warns that they are out of range."""
    config = json.loads(config_file.read_text())
    config["text_config"].update(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                                 pad_token_id=tokenizer.pad_token_id)
    config_file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def model_config(vocab_size: int, eos_token_id: int, image_size: int = scenes.IMAGE_SIZE, width: int = 128,
                 text_layers: int = 2, vision_layers: int = 3, patch_size: int = 8, max_text_length: int = 32
                 ) -> CLIPConfig:
    tower = {"hidden_size": width, "intermediate_size": 4 * width, "num_attention_heads": 4, "hidden_act": "gelu"}
    return CLIPConfig.from_dict({
        "projection_dim": width,
        "text_config": {**tower, "vocab_size": vocab_size, "num_hidden_layers": text_layers,
                        "max_position_embeddings": max_text_length, "eos_token_id": eos_token_id},
        "vision_config": {**tower, "num_hidden_layers": vision_layers, "image_size": image_size,
                          "patch_size": patch_size},
    })


def clip_loss(module: CLIP, params, model_state, batch, key):
    """batch: input_ids, attention_mask [b, T]; pixel_values [b, H, W, 3], row i of each a pair."""
    variables = {"params": params}
    text = module.apply(variables, batch["input_ids"], batch["attention_mask"], method=CLIP.get_text_features)
    image = module.apply(variables, batch["pixel_values"], method=CLIP.get_image_features)
    normalize = lambda x: x / jnp.linalg.norm(x, axis=-1, keepdims=True)  # noqa: E731
    scale = jnp.exp(jnp.minimum(params["logit_scale"], MAX_LOGIT_SCALE))
    logits = scale * normalize(text) @ normalize(image).T  # [texts, images]
    labels = jnp.arange(logits.shape[0])
    loss = (optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
            + optax.softmax_cross_entropy_with_integer_labels(logits.T, labels).mean()) / 2
    accuracy = jnp.mean(jnp.argmax(logits, axis=1) == labels)
    return loss, ({"accuracy": accuracy, "logit_scale": scale}, model_state)


def _batch(tokenizer, config: CLIPConfig, captions, images):
    ids, mask = clip_tokenize(tokenizer, captions, config.text_config.max_position_embeddings)
    pixels = clip_preprocess(list(images), config.vision_config.image_size, IMAGE_MEAN, IMAGE_STD)
    return {"input_ids": ids, "attention_mask": mask, "pixel_values": pixels}


def make_task(out: Path, batch_size: int, seed: int = 0, vocab_size: int = 512, eval_examples: int = 128,
              **sizes) -> Task:
    """The CLIP stage; the tokenizer is trained once into out/tokenizer and reused on resume."""
    from transformers import AutoTokenizer

    folder = Path(out) / "tokenizer"
    if (folder / "tokenizer.json").is_file():
        tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    else:
        captions = [scenes.caption(scenes.sample_scene(np.random.default_rng([seed, 2**31, i])))
                    for i in range(5000)]
        tokenizer = train_clip_tokenizer(captions, vocab_size, folder)
    config = model_config(len(tokenizer), tokenizer.eos_token_id, **sizes)
    module = CLIP(config)
    size = config.vision_config.image_size

    def images_at_size(images):
        return images if size == images.shape[1] else np.stack([
            np.asarray(Image.fromarray(image).resize((size, size), Image.Resampling.BOX))
            for image in images])

    def init(key):
        text = jnp.zeros((1, config.text_config.max_position_embeddings), jnp.int32)
        return module.init(key, text, jnp.zeros((1, size, size, 3), jnp.float32), jnp.ones_like(text))["params"], {}

    def batch(step):
        captions, images = scenes.sample_batch(np.random.default_rng([seed, step]), batch_size)
        return _batch(tokenizer, config, captions, images_at_size(images))

    eval_parts = [scenes.sample_batch(np.random.default_rng([seed, 10**9, i]), eval_examples // len(EVAL_SPLITS), split)
                  for i, split in enumerate(EVAL_SPLITS)]
    eval_batch = _batch(tokenizer, config, sum((p[0] for p in eval_parts), []),
                        images_at_size(np.concatenate([p[1] for p in eval_parts])))
    eval_loss = jax.jit(lambda p: clip_loss(module, p, {}, eval_batch, None))

    def evaluate(params, model_state):
        loss, (metrics, _) = eval_loss(params)
        # Text -> image top-1 among the eval_examples held-out scenes.
        return {"valid_loss": float(loss), "retrieval_top1": float(metrics["accuracy"])}

    def export(params, model_state, folder):
        folder = Path(folder)
        save_clip(folder, config, params)
        name_token_ids(folder / "config.json", tokenizer)
        tokenizer.save_pretrained(str(folder))
        (folder / "preprocessor_config.json").write_text(json.dumps({
            "image_processor_type": "CLIPImageProcessor", "do_resize": True, "size": {"shortest_edge": size},
            "do_center_crop": True, "crop_size": {"height": size, "width": size}, "do_rescale": True,
            "rescale_factor": 1 / 255, "do_normalize": True, "image_mean": list(IMAGE_MEAN),
            "image_std": list(IMAGE_STD), "resample": 3}, indent=2) + "\n")

    return Task(init=init, loss=functools.partial(clip_loss, module), batch=batch, export=export, evaluate=evaluate)


DEFAULT_LOOP = LoopConfig(steps=1500, batch_size=128, learning_rate=5e-4, warmup_steps=100, weight_decay=0.05,
                          log_every=25, eval_every=250)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_loop_arguments(parser, DEFAULT_LOOP, out="runs/clip")
    args = parser.parse_args(argv)
    loop = loop_config(args, DEFAULT_LOOP)
    train_from_args(make_task(args.out, args.batch_size, args.seed), loop, args)


if __name__ == "__main__":
    main()
