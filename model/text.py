"""Text front end: prompt normalizer, BART and CLIP tokenizers, CLIP image preprocessing.

Data flow: prompt -> `TextNormalizer` -> `tokenize_prompts` ([batch, max_length] ids for DalleBart);
images -> `clip_preprocess` and prompts -> `clip_tokenize` for the CLIP reranker.
Nothing here touches the network: tokenizers load from local folders and the hashtag splitter
reads a word list shipped with a model folder or with the `wordninja` package.
"""

import gzip
import html
import importlib.util
import json
import math
import re
from collections.abc import Callable, Sequence
from pathlib import Path

import emoji
import ftfy
import numpy as np
from PIL import Image
from unidecode import unidecode

from .errors import CheckpointError

# ---------------------------------------------------------------------------------------------
# Text normalizer (dalle-mini's TextNormalizer, step for step, minus the network)
# ---------------------------------------------------------------------------------------------

# Hashtags such as "#sunsetoverthemountains" are split where the sum of word costs is lowest,
# cost(word) = log(rank + 1) in a frequency-ordered list (Zipf's law); unknown words cost inf.
_NOT_HASHTAG_CHAR = re.compile(r"[^a-zA-Z0-9']+")

# Letters-only placeholders survive the punctuation steps; the marker is upstream's, so that even
# odd inputs that contain it (or hashtags the splitter cuts through it) come out the same.
_MARK = "xtokx"
# (pattern, replacement, placeholder, restored text), applied in this order before punctuation.
_PROTECTED = [
    # dotted words and numbers: "u.s.", "3.5"
    (re.compile(r"(\w)\.(\w)"), rf"\1{_MARK}dot{_MARK}\2", f"{_MARK}dot{_MARK}", "."),
    # contractions: "it's", "don't", "we'll", "they're", "i've", "i'd", "i'm"
    (re.compile(r"'(?=(?:[stdm]|ll|re|ve)\b)"), f"{_MARK}quote{_MARK}", f"{_MARK}quote{_MARK}", "'"),
    # dates: "12/31"
    (re.compile(r"(\d)/(\d)"), rf"\1{_MARK}slash{_MARK}\2", f"{_MARK}slash{_MARK}", "/"),
]

_LEADING_WIKI_REF = re.compile(r"\A\s*\[\d+\]")
_TRAILING_WIKI_REF = re.compile(r"\[\d+\]\s*\Z")
_HTML_TAG = re.compile(r"<[^<]+?>")
_URL = re.compile(r"http\S+")
_THOUSANDS_COMMA = re.compile(r"(\d),(\d{3})")
_HYPHEN_IN_WORD = re.compile(r"(\w)-(\w)")
_SPACED_SYMBOL = re.compile(r"([%&/$*])")
_HASHTAG = re.compile(r"#(\w+)")
_IGNORED_CHAR = re.compile(r"[_#\\]")
_QUOTE = re.compile(r"""['"`]""")
_PUNCTUATION = re.compile(r"[()\[\].,|:;?!=+~\-/{}]")
# 4+ copies, not 3, so that roman numerals such as "viii" survive; digits are never collapsed.
_REPEATED_CHAR = re.compile(r"(\D)(\1{3,})")
_QUOTE_RUN = re.compile(r'(\s*"+\s*)+')
_COMMA_RUN = re.compile(r"(\s*,+\s*)+")
_WHITESPACE = re.compile(r"\s+")


def _default_word_list() -> list[str]:
    """The frequency-ordered English word list that the `wordninja` package ships.

    `wordninja` builds its own model when imported (~0.3 s), so its data file is located
    through the import system without executing the module.
    """
    spec = importlib.util.find_spec("wordninja")
    if spec is None or spec.origin is None:
        raise ModuleNotFoundError(
            "the hashtag splitter needs a word list: pass word_frequency_file= "
            "(enwiki-words-frequency.txt from a model folder) or `pip install wordninja`"
        )
    path = Path(spec.origin).parent / "wordninja" / "wordninja_words.txt.gz"
    with gzip.open(path, "rt", encoding="utf8") as f:
        return f.read().split()


def _read_word_frequency_file(path: str | Path) -> list[str]:
    """Words of an upstream `enwiki-words-frequency.txt` (`word count` lines, most frequent first)."""
    lines = Path(path).read_text(encoding="utf8").splitlines()
    return [line.split()[0] for line in lines if line.strip()]


class HashtagSplitter:
    """Splits a run of letters and digits into the likeliest words (wordninja's dynamic programme).

    The word list is read on the first call, so building a normalizer stays cheap.
    """

    def __init__(self, word_frequency_file: str | Path | None = None):
        self.word_frequency_file = word_frequency_file
        self._word_cost: dict[str, float] | None = None
        self._longest_word = 0

    def _load(self) -> dict[str, float]:
        if self._word_cost is None:
            if self.word_frequency_file is None:
                words = _default_word_list()
            else:
                words = _read_word_frequency_file(self.word_frequency_file)
            # A word listed twice keeps the cost of its later rank, as upstream's dict does.
            word_cost = {word: math.log(rank + 1) for rank, word in enumerate(words)}
            self._longest_word = max(map(len, word_cost))
            self._word_cost = word_cost
        return self._word_cost

    def __call__(self, text: str) -> str:
        return " ".join(word for piece in _NOT_HASHTAG_CHAR.split(text) for word in self._split(piece))

    def _split(self, s: str) -> list[str]:
        word_cost = self._load()
        # best_cost[i]: cheapest split of s[:i]; last_length[i]: length of its last word.
        best_cost = [0.0]
        last_length = [0]
        for end in range(1, len(s) + 1):
            # Ties go to the shortest last word (tuple order), exactly as upstream's min().
            cost, length = min(
                (best_cost[end - length] + word_cost.get(s[end - length : end].lower(), math.inf), length)
                for length in range(1, min(end, self._longest_word) + 1)
            )
            best_cost.append(cost)
            last_length.append(length)

        words: list[str] = []  # collected from the end backwards
        end = len(s)
        while end > 0:
            word = s[end - last_length[end] : end]
            # Glue a split-off "'s" and runs of digits back onto the word before them; a lone
            # apostrophe stays on its own.
            follows = words[-1] if words else ""
            if word != "'" and follows and (follows == "'s" or (word[-1].isdigit() and follows[0].isdigit())):
                words[-1] = word + follows
            else:
                words.append(word)
            end -= len(word)
        return words[::-1]


class TextNormalizer:
    """dalle-mini's prompt normalizer, with the same output string for the same input.

    `word_frequency_file`: an upstream `enwiki-words-frequency.txt` (e.g. from a model folder);
    None uses the word list of the `wordninja` package. Only hashtag splitting depends on it.
    Upstream's CC12M-only `<person>` substitution (a random choice among "a person", "someone",
    "somebody") is left out: prompts must normalize deterministically. Here `<person>` is dropped
    with the other HTML-like tags.
    """

    def __init__(self, word_frequency_file: str | Path | None = None):
        self.split_hashtag = HashtagSplitter(word_frequency_file)

    def __call__(self, text: str) -> str:
        t = ftfy.fix_text(text)  # mojibake, e.g. "cafÃ©" -> "café"
        t = html.unescape(html.unescape(t))  # captions are often escaped twice: "&amp;amp;"
        t = emoji.demojize(t)  # names before unidecode, which would drop emoji
        t = unidecode(t).lower()
        t = _TRAILING_WIKI_REF.sub("", _LEADING_WIKI_REF.sub("", t))
        t = _HTML_TAG.sub(" ", t)
        t = _URL.sub("", t)
        # Twice, because each pass consumes the digit before a comma: "1,000,000".
        t = _THOUSANDS_COMMA.sub(r"\1\2", _THOUSANDS_COMMA.sub(r"\1\2", t))
        for pattern, marked, _, _ in _PROTECTED:
            t = pattern.sub(marked, t)
        t = _HYPHEN_IN_WORD.sub(r"\1 \2", t)
        t = _SPACED_SYMBOL.sub(r" \1 ", t)
        t = _HASHTAG.sub(lambda m: self.split_hashtag(m.group(1)), t)
        t = _IGNORED_CHAR.sub(" ", t)
        t = _QUOTE.sub(' " ', t)
        t = _PUNCTUATION.sub(",", t)
        for _, _, placeholder, original in _PROTECTED:
            t = t.replace(placeholder, original)
        t = _REPEATED_CHAR.sub(r"\1", t)
        t = _QUOTE_RUN.sub(' " ', t)
        t = _COMMA_RUN.sub(", ", t)
        t = _WHITESPACE.sub(" ", t).strip()
        t = t.removesuffix(",").removeprefix(",").strip()
        # The BART vocabulary was trained on text where every word follows a space ("Ġword").
        return " " + t


# ---------------------------------------------------------------------------------------------
# BART tokenizer (DalleBart's text input)
# ---------------------------------------------------------------------------------------------

BART_SPECIAL_TOKENS = ("<s>", "<pad>", "</s>", "<unk>", "<mask>")  # ids 0..4 in trained vocabularies


def _require_tokenizer_files(folder: Path) -> None:
    if not ((folder / "tokenizer.json").is_file() or (folder / "vocab.json").is_file()):
        raise CheckpointError(f"{folder}: no tokenizer.json or vocab.json + merges.txt in this folder")


def _prompt_list(prompts: Sequence[str]) -> list[str]:
    # A bare string would otherwise be tokenized character by character.
    if isinstance(prompts, str):
        raise TypeError("prompts must be a list of strings, not a single string")
    return list(prompts)


def _encode_padded(tokenizer, texts: list[str], max_length: int) -> tuple[np.ndarray, np.ndarray]:
    """(input_ids, attention_mask) np.int32 [batch, max_length]; the tokenizer adds start/end tokens."""
    encoded = tokenizer(texts, padding="max_length", truncation=True, max_length=max_length, return_tensors="np")
    return encoded["input_ids"].astype(np.int32), encoded["attention_mask"].astype(np.int32)


def load_bart_tokenizer(folder: str | Path):
    """A `BartTokenizerFast` from a local model folder (never downloads)."""
    from transformers import BartTokenizerFast

    folder = Path(folder)
    _require_tokenizer_files(folder)
    tokenizer = BartTokenizerFast.from_pretrained(str(folder), local_files_only=True)
    ids = (tokenizer.bos_token_id, tokenizer.pad_token_id, tokenizer.eos_token_id)
    if ids != (0, 1, 2):
        raise CheckpointError(f"{folder}: tokenizer has <s>, <pad>, </s> at ids {ids}; DalleBart expects (0, 1, 2)")
    return tokenizer


def tokenize_prompts(
    tokenizer, prompts: Sequence[str], max_length: int, normalizer: Callable[[str], str] | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Prompts -> (input_ids, attention_mask), both np.int32 [batch, max_length].

    Each row is `[0, ..., 2]` padded with 1; longer prompts are cut so that `</s>` stays last.
    The empty string without a normalizer gives `[0, 2, 1, 1, ...]` / `[1, 1, 0, ...]`: the
    unconditional input for super-conditioning (upstream never normalizes it; normalizing ""
    gives " ", a different token).
    """
    texts = _prompt_list(prompts)
    if normalizer is not None:
        texts = [normalizer(t) for t in texts]
    return _encode_padded(tokenizer, texts, max_length)


def train_bart_tokenizer(texts: Sequence[str], vocab_size: int, folder: str | Path):
    """Trains a byte-level BPE on `texts` and saves it in `folder` as a BART tokenizer.

    Pass texts as the model will see them (normalized, with the leading space). The folder gets
    `vocab.json` and `merges.txt` (the files of the published models) plus the transformers
    `tokenizer.json`/`tokenizer_config.json`; special tokens sit at ids 0..4. Returns the
    tokenizer as `load_bart_tokenizer(folder)` reads it back.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import BartTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(BART_SPECIAL_TOKENS),
        # all 256 byte symbols, so that any prompt encodes without <unk>
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(texts, trainer)

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    bpe.model.save(str(folder))
    vocab = json.loads((folder / "vocab.json").read_text(encoding="utf8"))
    merge_lines = (folder / "merges.txt").read_text(encoding="utf8").splitlines()
    merges = [tuple(line.split(" ")) for line in merge_lines if line and not line.startswith("#version")]
    # Built from vocab=/merges= (the vocab_file= keywords are silently ignored in transformers 5).
    BartTokenizerFast(vocab=vocab, merges=merges).save_pretrained(str(folder))
    return load_bart_tokenizer(folder)


# ---------------------------------------------------------------------------------------------
# CLIP text and image inputs (reranker)
# ---------------------------------------------------------------------------------------------

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def load_clip_tokenizer(folder: str | Path):
    """The tokenizer of a local CLIP folder (never downloads), of the class its tokenizer_config.json
    names (CLIPTokenizer for OpenAI's; the embedded model's CLIP reads its own BPE), else
    CLIPTokenizerFast. Not AutoTokenizer: importing it imports torch wherever torch is installed,
    and torch stays resident (0.18 GiB)."""
    import transformers

    folder = Path(folder)
    _require_tokenizer_files(folder)
    try:
        named = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8")).get("tokenizer_class")
    except (OSError, ValueError, AttributeError):  # missing, not JSON, not an object
        named = None
    tokenizer_class = getattr(transformers, named, None) if isinstance(named, str) else None
    if not (isinstance(tokenizer_class, type) and issubclass(tokenizer_class, transformers.PreTrainedTokenizerBase)):
        tokenizer_class = transformers.CLIPTokenizerFast
    try:
        return tokenizer_class.from_pretrained(str(folder), local_files_only=True)
    except (OSError, ValueError) as error:
        raise CheckpointError(f"{folder}: cannot read the CLIP tokenizer ({error}).") from None


def clip_tokenize(tokenizer, prompts: Sequence[str], max_length: int = 77) -> tuple[np.ndarray, np.ndarray]:
    """Prompts -> (input_ids, attention_mask), np.int32 [batch, max_length]: start, text, end, pad."""
    return _encode_padded(tokenizer, _prompt_list(prompts), max_length)


def _to_rgb(image: Image.Image | np.ndarray) -> Image.Image:
    if isinstance(image, np.ndarray):
        image = Image.fromarray(image)
    # Transparent pixels count as white, as in transformers' CLIP processor.
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image.convert("RGB")


def clip_preprocess(
    images: Sequence[Image.Image | np.ndarray],
    size: int = 224,
    mean: Sequence[float] = OPENAI_CLIP_MEAN,
    std: Sequence[float] = OPENAI_CLIP_STD,
) -> np.ndarray:
    """Images (PIL, or uint8 arrays [h, w, 3]) -> float32 [n, size, size, 3], NHWC.

    Matches transformers' CLIPImageProcessor (PIL path): bicubic resize of the shortest side to
    `size`, center crop, x / 255, then (x - mean) / std per channel.
    """
    mean32 = np.asarray(mean, np.float32)
    std32 = np.asarray(std, np.float32)
    batch = np.empty((len(images), size, size, 3), np.float32)
    for n, image in enumerate(images):
        image = _to_rgb(image)
        width, height = image.size
        short, long = min(width, height), max(width, height)
        long = int(size * long / short)  # same rounding as transformers (truncation)
        new_size = (size, long) if width <= height else (long, size)
        pixels = np.asarray(image.resize(new_size, resample=Image.Resampling.BICUBIC))
        top = (pixels.shape[0] - size) // 2
        left = (pixels.shape[1] - size) // 2
        crop = pixels[top : top + size, left : left + size]
        # float64 scaling then a float32 cast, bit for bit what transformers computes.
        scaled = (crop.astype(np.float64) * (1 / 255)).astype(np.float32)
        batch[n] = (scaled - mean32) / std32
    return batch
