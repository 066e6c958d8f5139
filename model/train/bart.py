"""Train DalleBart on (caption, VQGAN codes) datasets: text -> image codes by teacher forcing.

    python -m model.train.codes --vqgan runs/vqgan/model --out runs/codes      # the dataset first
    python -m model.train.bart --data runs/codes --out runs/bart                # 64 codes: ~35 min on 2 CPU cores
    python -m model.train.bart --data runs/codes --out runs/bart --init-from checkpoints/emoji/bart --batch-size 32
                                        # start from a trained model, e.g. after the VQGAN changed
    python -m model.train.bart --data runs/codes --out runs/bart3 --init-from checkpoints/emoji/bart \
        --decoder-layers 3 --batch-size 32   # a shallower, faster decoder from a subset of the trained layers

`--data` is a folder (or file) in upstream's training format (`caption`, `encoding` columns; jsonl,
or parquet with pyarrow), so upstream-style encoded datasets work too; `valid.*` files in the folder
are the validation set and the rest is training data.

Text: a byte-level BPE tokenizer trained here on the training captions (after the dalle-mini text
normalizer, as `normalize_text` makes the pipeline normalize prompts), saved with the model.
About 10% of the captions are blanked to the empty prompt, the unconditional input that
super-conditioning (condition_scale) contrasts with.

Loss: cross entropy of `[start, c0 .. c_{n-2}] -> [c0 .. c_{n-1}]`, teacher forced.

Default model (~6 M parameters, ~25 MB): d_model 256, 3 encoder + 4 decoder layers, 8 heads, GLU
width 512; the number of codes and the codebook size come from the data. AdamW 1e-3, batch 64,
warmup 100, cosine decay. 256 codes per image (the f=4 VQGAN) train at ~9 captions/s on 2 CPU cores,
~10x fewer than 64 codes, and at ~7,100 captions/s at batch 512 on one H200 GPU (`--minutes 4`: 2,297
steps; encode 300k scenes first with `model.train.codes --workers 13 --format parquet`).
"""

import argparse
import functools
import math
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

from model.bart import DalleBart, DalleBartConfig
from model.checkpoint import load_dalle_bart, save_dalle_bart
from model.data.dataset import read_dataset
from model.text import TextNormalizer, load_bart_tokenizer, tokenize_prompts, train_bart_tokenizer
from model.train.loop import LoopConfig, Task, add_loop_arguments, loop_config, train_from_args

BLANK_CAPTION_PROBABILITY = 0.1
TOKENIZER_CAPTIONS = 20000  # captions the BPE is trained on (the scene vocabulary is small)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt")


def model_config(encoder_vocab_size: int, image_vocab_size: int, image_length: int, max_text_length: int,
                 **sizes) -> DalleBartConfig:
    defaults = dict(d_model=256, encoder_layers=3, decoder_layers=4, encoder_attention_heads=8,
                    decoder_attention_heads=8, encoder_ffn_dim=512, decoder_ffn_dim=512)
    return DalleBartConfig(**{**defaults, **sizes}, encoder_vocab_size=encoder_vocab_size,
                           image_vocab_size=image_vocab_size, image_length=image_length,
                           max_text_length=max_text_length, normalize_text=True)


def split_files(data) -> tuple[list[Path], list[Path]]:
    """(training files, validation files) of a dataset folder: `valid*` files validate."""
    data = Path(data)
    if not data.is_dir():
        return [data], []
    files = sorted(p for p in data.iterdir() if p.suffix in (".jsonl", ".parquet"))
    return [p for p in files if not p.name.startswith("valid")], [p for p in files if p.name.startswith("valid")]


def _read(files) -> tuple[list[str], np.ndarray]:
    captions, codes = [], []
    for file in files:
        texts, rows = read_dataset(file)
        captions += texts
        codes.append(rows)
    return captions, np.concatenate(codes)


def build_tokenizer(captions, folder: Path, vocab_size: int = 1024):
    """The run's BART tokenizer, trained on normalized captions once and reused on resume."""
    if (folder / "tokenizer.json").is_file():
        return load_bart_tokenizer(folder)
    normalize = TextNormalizer()
    texts = [normalize(c) for c in captions[:TOKENIZER_CAPTIONS]]
    return train_bart_tokenizer(texts, vocab_size, folder)


def text_length(tokenizer, captions) -> int:
    """Encoder positions: the longest caption's token count with some room, a multiple of 8."""
    normalize = TextNormalizer()
    longest = max(len(tokenizer(normalize(c))["input_ids"]) for c in captions[:5000])
    return -(-(longest + 4) // 8) * 8


def bart_loss(module: DalleBart, params, model_state, batch, key):
    """batch: input_ids, attention_mask [b, T]; codes [b, S]. Mean cross entropy over all codes."""
    cfg = module.config
    codes = batch["codes"]
    start = jnp.full((codes.shape[0], 1), cfg.decoder_start_token_id, codes.dtype)
    decoder_input = jnp.concatenate([start, codes[:, :-1]], axis=1)
    logits = module.apply({"params": params}, batch["input_ids"], batch["attention_mask"], decoder_input)
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, codes).mean()
    accuracy = jnp.mean(jnp.argmax(logits, -1) == codes)
    return loss, ({"accuracy": accuracy}, model_state)


_ARCHITECTURE = ("d_model", "encoder_layers", "decoder_layers", "encoder_attention_heads", "decoder_attention_heads",
                 "encoder_ffn_dim", "decoder_ffn_dim", "max_text_length")


def warm_start(fresh: dict, trained: dict) -> tuple[dict, list[str]]:
    """`fresh` parameters with every `trained` parameter of the same name and shape copied in.

    The decoder's position embeddings are resampled when both lengths are square grids of codes
    (8x8 -> 16x16 for a VQGAN with half the downsampling): each new cell starts as the old cell that
    covers it, so where things go, which the trained model learned from the captions, carries over.
    Returns (params, names of the parameters left at their fresh initialisation), e.g. the code
    embeddings and lm_head of a new codebook.
    """
    trained_leaves = {jax.tree_util.keystr(path): leaf for path, leaf in jax.tree_util.tree_leaves_with_path(trained)}
    kept_fresh = []

    def pick(path, leaf):
        name = jax.tree_util.keystr(path)
        old = trained_leaves.get(name)
        if old is not None and old.shape == leaf.shape:
            return jnp.asarray(old, leaf.dtype)
        if old is not None and "decoder']['embed_positions" in name:
            old_side, new_side = math.isqrt(old.shape[0]), math.isqrt(leaf.shape[0])
            if old_side**2 == old.shape[0] and new_side**2 == leaf.shape[0] and old.shape[1:] == leaf.shape[1:]:
                parent = np.arange(new_side) * old_side // new_side
                index = (parent[:, None] * old_side + parent[None, :]).reshape(-1)
                return jnp.asarray(old, leaf.dtype)[index]
        if old is not None and "encoder']['embed_positions" in name and old.shape[0] < leaf.shape[0]:
            return leaf.at[:old.shape[0]].set(jnp.asarray(old, leaf.dtype))  # longer prompts: new rows fresh
        kept_fresh.append(name)
        return leaf

    return jax.tree_util.tree_map_with_path(pick, fresh), kept_fresh


def keep_decoder_layers(params: dict, count: int) -> dict:
    """The trained tree with `count` of its decoder layers, evenly spaced and keeping the first and
    the last (4 -> 3 keeps 0, 2, 3), as "shrink and fine-tune" distillation does (DistilBART).

    Decoding a code costs one pass through every decoder layer, 256 per image, so the number of
    decoder layers sets the sampling time of a small model (3 of 4 layers: a warm 3x3 grid
    ~1.1 -> ~0.8 s for the embedded model here).
    """
    layers = params["model"]["decoder"]["layers"]
    total = jax.tree_util.tree_leaves(layers)[0].shape[0]
    if not 0 < count <= total:
        raise ValueError(f"cannot keep {count} of {total} decoder layers")
    keep = np.round(np.linspace(0, total - 1, count)).astype(int)
    sliced = jax.tree_util.tree_map(lambda x: np.asarray(x)[keep], layers)
    return {**params, "model": {**params["model"], "decoder": {**params["model"]["decoder"], "layers": sliced}}}


def make_task(data, out: Path, batch_size: int, seed: int = 0, vocab_size: int = 1024, init_from=None,
              decoder_layers=None, max_text_length=None, **sizes) -> Task:
    """The DalleBart stage over the dataset at `data`; the tokenizer is kept in out/tokenizer.

    init_from: a trained DalleBart folder to start from (see warm_start); its tokenizer and
    architecture are reused, the codebook size and number of codes come from the data.
    decoder_layers: with init_from, keep this many of its decoder layers (keep_decoder_layers);
    without, the new model's depth.
    """
    out = Path(out)
    train_files, valid_files = split_files(data)
    captions, codes = _read(train_files)
    if init_from is not None:
        trained_module, trained_params = load_dalle_bart(init_from)
        sizes = {**sizes, **{name: getattr(trained_module.config, name) for name in _ARCHITECTURE}}
        if decoder_layers is not None:
            trained_params = keep_decoder_layers(trained_params, decoder_layers)
        (out / "tokenizer").mkdir(parents=True, exist_ok=True)
        for name in TOKENIZER_FILES:
            if (Path(init_from) / name).is_file() and not (out / "tokenizer" / name).is_file():
                shutil.copy2(Path(init_from) / name, out / "tokenizer" / name)
    if decoder_layers is not None:
        sizes["decoder_layers"] = decoder_layers
    if max_text_length:  # e.g. longer paraphrased prompts than the trained model's templates
        sizes["max_text_length"] = max_text_length
    tokenizer = build_tokenizer(captions, out / "tokenizer", vocab_size)
    # The VQGAN's codebook size; when not given, the smallest power of two above the codes seen.
    image_vocab = int(sizes.pop("image_vocab_size", 0)) or 1 << int(codes.max()).bit_length()
    text_positions = sizes.pop("max_text_length", None) or text_length(tokenizer, captions)
    config = model_config(len(tokenizer), image_vocab, codes.shape[1], text_positions, **sizes)
    module = DalleBart(config)
    normalize = TextNormalizer()
    ids, mask = tokenize_prompts(tokenizer, captions, config.max_text_length, normalize)
    blank_ids, blank_mask = tokenize_prompts(tokenizer, [""], config.max_text_length)  # as the sampler does

    def init(key):
        text = jnp.zeros((1, config.max_text_length), jnp.int32)
        image = jnp.zeros((1, config.image_length), jnp.int32)
        params = module.init(key, text, text, image)["params"]
        if init_from is not None:
            params, kept_fresh = warm_start(params, trained_params)
            print(f"warm start from {init_from}; freshly initialised: {', '.join(kept_fresh) or 'nothing'}")
        return params, {}

    def batch(step):
        rng = np.random.default_rng([seed, step])
        rows = rng.integers(0, len(codes), batch_size)
        blank = (rng.random(batch_size) < BLANK_CAPTION_PROBABILITY)[:, None]
        return {"input_ids": np.where(blank, blank_ids, ids[rows]),
                "attention_mask": np.where(blank, blank_mask, mask[rows]), "codes": codes[rows]}

    evaluate = None
    if valid_files:
        valid_captions, valid_codes = _read(valid_files)
        valid_ids, valid_mask = tokenize_prompts(tokenizer, valid_captions, config.max_text_length, normalize)
        valid_loss = jax.jit(lambda p, b: bart_loss(module, p, {}, b, None))

        def evaluate(params, model_state):
            totals = np.zeros(2)
            for start in range(0, len(valid_codes) - batch_size + 1, batch_size):
                part = slice(start, start + batch_size)
                loss, (metrics, _) = valid_loss(params, {"input_ids": valid_ids[part], "attention_mask": valid_mask[part],
                                                         "codes": valid_codes[part]})
                totals += [float(loss), float(metrics["accuracy"])]
            count = max((len(valid_codes) // batch_size), 1)
            return {"valid_loss": totals[0] / count, "valid_accuracy": totals[1] / count}

    def export(params, model_state, folder):
        save_dalle_bart(folder, config, params)
        tokenizer.save_pretrained(str(folder))

    return Task(init=init, loss=functools.partial(bart_loss, module), batch=batch, export=export, evaluate=evaluate)


DEFAULT_LOOP = LoopConfig(steps=2500, batch_size=64, learning_rate=1e-3, warmup_steps=100, weight_decay=0.01,
                          log_every=25, eval_every=250)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="runs/codes", help="dataset folder or file (caption, encoding)")
    add_loop_arguments(parser, DEFAULT_LOOP, out="runs/bart")
    parser.add_argument("--d-model", type=int, default=256)
    parser.add_argument("--image-vocab-size", type=int, default=0,
                        help="the VQGAN's codebook size (default: inferred from the codes)")
    parser.add_argument("--init-from", default=None,
                        help="a trained DalleBart folder to start from (its tokenizer and architecture; "
                             "e.g. checkpoints/emoji/bart when the VQGAN changed)")
    parser.add_argument("--decoder-layers", type=int, default=None,
                        help="decoder depth (default 4); with --init-from, keeps that many of its layers")
    parser.add_argument("--max-text-length", type=int, default=None,
                        help="text positions (default: the --init-from model's, else from the captions)")
    args = parser.parse_args(argv)
    out = Path(args.out)
    if not args.resume and out.exists():
        shutil.rmtree(out / "tokenizer", ignore_errors=True)
    loop = loop_config(args, DEFAULT_LOOP)
    task = make_task(args.data, out, args.batch_size, args.seed, d_model=args.d_model,
                     image_vocab_size=args.image_vocab_size, init_from=args.init_from,
                     decoder_layers=args.decoder_layers, max_text_length=args.max_text_length)
    train_from_args(task, loop, args)


if __name__ == "__main__":
    main()
