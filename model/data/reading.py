"""Free-form prompts read into the emoji model's caption templates (prompt rewriting for a closed world).

The embedded model was trained on one caption template per kind of scene (`scenes.template`), and
follows other wordings poorly. Large text-to-image services rewrite a visitor's prompt before the
model sees it; for a model whose world is a known list of objects, colours, sizes, positions,
relations and counts, the rewrite can be exact: `read(text)` finds those things wherever and however
the text says them, and returns the template caption of that scene (or None when it names no known
object, so the prompt is used as written).

- Words within a typing slip of a word the reader knows are read as it ("girafe", "rigth"; spelling.py).
  "4k", "1080p" are no counts; "|", "/", "#" separate like commas.
- Objects: vocabulary names, plurals and everyday names ("puppy", "bike", "telly"), longest match first.
  More than two different objects: the first two are drawn.
- Counts: a number (word or numeral, "a pair of", "a couple of") or a plural names a count scene;
  counts above 4 draw 4, a plural without a number 2, "one" a single object.
- Background: a colour word next to a word for the background or picture ("blue background",
  "background: blue", "a blue picture with", "on blue", "against a pink wall"); a colour right before
  an object names the object's colour, which the model cannot change ("a red apple"), so it is
  dropped. No background named: the first of white, blue, yellow, black that the object stands out on.
- Size ("tiny", "big", ...; default large), position ("upper left", "top-left corner", "middle";
  default center) and relations ("left of", "on top of", "beneath", "next to" = left of, "A and B,
  the B on the left", "A with B on its left", "A, and below it B", "top: A / bottom: B") in either order.
"""

import re

from PIL import Image

from model.data import scenes, spelling
from model.data.vocabulary import PLURALS, VOCABULARY

SYNONYMS = {
    "kitten": "cat", "kitty": "cat", "puppy": "dog", "doggy": "dog", "bunny": "rabbit", "hen": "chicken",
    "lamb": "sheep", "pony": "horse", "plane": "airplane", "aeroplane": "airplane", "jet": "airplane",
    "bike": "bicycle", "automobile": "car", "lorry": "truck", "boat": "sailboat", "donut": "doughnut",
    "burger": "hamburger", "coffee": "coffee cup", "cup": "coffee cup", "beer": "beer mug",
    "wine": "wine glass", "lightbulb": "light bulb", "bulb": "light bulb", "phone": "telephone",
    "tv": "television", "present": "gift", "ufo": "flying saucer", "dino": "dinosaur", "croc": "crocodile",
    "ladybird": "ladybug", "corn": "corn cob", "chili": "chili pepper", "chilli": "chili pepper",
    "hotdog": "hot dog", "icecream": "ice cream", "spaceship": "rocket", "firetruck": "fire engine",
    "motorbike": "motorcycle", "seashell": "shell", "sea shell": "shell",
    "cellphone": "telephone", "taxi": "car",
    # More everyday and British names, so that what people call a thing finds it.
    "padlock": "lock", "honeybee": "bee", "bumblebee": "bee", "lady beetle": "ladybug", "lady bug": "ladybug",
    "telly": "television", "television set": "television", "diamond": "gem", "jewel": "gem", "gemstone": "gem",
    "teddy": "teddy bear", "aubergine": "eggplant", "chopper": "helicopter", "pushbike": "bicycle",
    "gamepad": "game controller", "joypad": "game controller", "controller": "game controller",
    "mandarin": "tangerine", "clementine": "tangerine", "satsuma": "tangerine", "spud": "potato",
    "tater": "potato", "fir": "pine tree", "fir tree": "pine tree", "christmas tree": "pine tree",
    "evergreen": "pine tree", "jigsaw": "puzzle piece", "jigsaw piece": "puzzle piece", "fire truck": "fire engine",
    "four leaf clover": "clover", "shamrock": "clover", "bag of money": "money bag", "moneybag": "money bag",
    "sack of money": "money bag", "tortoise": "turtle", "alligator": "crocodile", "gator": "crocodile",
    "rooster": "chicken", "piglet": "pig", "stallion": "horse", "stag": "deer", "ewe": "sheep", "ram": "sheep",
    "pup": "dog", "doggo": "dog", "brontosaurus": "dinosaur", "sauropod": "dinosaur", "capsicum": "bell pepper",
    "cheeseburger": "hamburger", "biscuit": "cookie", "lolly": "lollipop", "honey": "honey pot",
    "honey jar": "honey pot", "coffee mug": "coffee cup", "teacup": "coffee cup", "tea cup": "coffee cup",
    "wineglass": "wine glass", "glass of wine": "wine glass", "pint": "beer mug", "tankard": "beer mug",
    "cab": "car", "locomotive": "train", "aircraft": "airplane", "airliner": "airplane", "yacht": "sailboat",
    "kayak": "canoe", "sakura": "cherry blossom", "palm": "palm tree", "maple": "maple leaf",
    "houseplant": "potted plant", "pot plant": "potted plant", "brolly": "umbrella", "hatchet": "axe",
    "spyglass": "telescope", "computer": "laptop", "notebook computer": "laptop", "football": "soccer ball",
    "tophat": "top hat", "t shirt": "shirt", "tshirt": "shirt", "tee": "shirt", "gown": "dress",
    "trainer": "sneaker", "running shoe": "sneaker", "shoe": "sneaker", "dice": "die", "sand timer": "hourglass",
    "clock": "alarm clock", "fire": "flame", "lightning": "lightning bolt", "thunderbolt": "lightning bolt",
    "drop": "droplet", "raindrop": "droplet", "water drop": "droplet", "earth": "globe", "planet earth": "globe",
    "magnifier": "magnifying glass", "parcel": "package", "box": "package", "gift box": "gift", "martian": "alien",
}
SIZE_WORDS = {
    "small": ("small", "smol", "little", "tiny", "teeny", "teensy", "itty", "bitty", "mini", "miniature", "wee",
              "smaller", "minuscule", "petite"),
    "medium": ("medium", "med", "mid", "midsize", "midsized", "normal", "average", "regular", "moderate",
               "moderately"),
    "large": ("large", "big", "giant", "huge", "enormous", "massive", "bigger", "larger", "gigantic", "jumbo",
              "colossal", "oversized"),
}
COLOUR_WORDS = {name: (name,) for name in scenes.BACKGROUNDS} | {
    "gray": ("gray", "grey"), "purple": ("purple", "violet", "lilac"), "teal": ("teal", "turquoise", "cyan")}
NUMBERS = {"one": 1, "a": 1, "an": 1, "single": 1, "two": 2, "both": 2, "pair": 2, "couple": 2, "twin": 2,
           "duo": 2, "three": 3, "trio": 3, "triple": 3, "four": 4, "quartet": 4, "five": 5, "six": 6, "seven": 7,
           "eight": 8, "nine": 9, "ten": 10, "several": 3, "many": 4, "lots": 4}
PICTURE_WORDS = ("background", "backdrop", "bg", "picture", "image", "wall", "canvas", "scene", "photo",
                 "backgroud", "colour", "color", "drawing")
# Not "up"/"down": "curled up", "lying down" place nothing.
VERTICAL = {"top": "top", "upper": "top", "bottom": "bottom", "lower": "bottom"}

CENTRE = ("center", "centre", "middle", "central", "centered", "centred")
# Relation phrases as word tuples -> the relation of the object before them to the one after.
RELATION_PHRASES = {
    ("left", "of"): "to the left of", ("left", "side", "of"): "to the left of",
    ("right", "of"): "to the right of", ("right", "side", "of"): "to the right of",
    ("above",): "above", ("over",): "above", ("top", "of"): "above", ("atop",): "above",
    ("higher", "than"): "above", ("on", "top", "of"): "above", ("upon",): "above",
    ("below",): "below", ("under",): "below", ("beneath",): "below", ("underneath",): "below",
    ("lower", "than"): "below",
}
SIDES = {"left": "to the left of", "right": "to the right of", "top": "above", "bottom": "below",
         "above": "above", "below": "below"}

_PHRASES_LONGEST_FIRST = sorted(RELATION_PHRASES.items(), key=lambda item: -len(item[0]))
_NAMES = {tuple(name.split()): name for name in VOCABULARY} | {tuple(p.split()): n for n, p in PLURALS.items()}
_NAMES |= {tuple(word.split()): name for word, name in SYNONYMS.items()}
_NAMES |= {(word + "s",): name for word, name in SYNONYMS.items() if " " not in word}
_NAMES |= {(word[:-1] + "ies",): name for word, name in SYNONYMS.items() if word.endswith("y")}
# Plurals that differ from the singular ("fish", "sheep", "deer" say nothing about the count).
_PLURAL_FORMS = {tuple(p.split()) for n, p in PLURALS.items() if p != n} | {(w + "s",) for w in SYNONYMS}
_PLURAL_FORMS |= {(word[:-1] + "ies",) for word in SYNONYMS if word.endswith("y")}
_LONGEST = max(len(words) for words in _NAMES)
_COLOURS = {word: name for name, words in COLOUR_WORDS.items() for word in words}
_SIZES = {word: name for name, words in SIZE_WORDS.items() for word in words}


def known_words() -> set[str]:
    """Every word the reader looks for; others within a typing slip of one are read as it (spelling).
    When these change, remake spelling's common_words.txt (see spelling.common_words)."""
    words = {w for key in _NAMES for w in key} | set(_COLOURS) | set(_SIZES) | set(NUMBERS) | set(PICTURE_WORDS)
    words |= set(VERTICAL) | set(CENTRE) | set(_LABELS) | {w for phrase in RELATION_PHRASES for w in phrase}
    return words | {"corner", "side", "edge"}


def _words(text: str) -> list[str]:
    text = str(text).lower().replace("-", " ").replace("_", " ")
    text = re.sub(r"\b\d+ ?(k|p|px|fps|mp|hd)\b", " ", text)  # "4k", "1080p": quality words, no count
    text = re.sub(r"\b(top|bottom|upper|lower)(left|right)\b", r"\1 \2", text)  # "#topright"
    text = re.sub(r"[|/#\u2013\u2014]", ",", text)  # separators part what they separate
    return [mend(w) for w in re.findall(r"[a-z]+|\d+|[,;:.!?]", re.sub(r"(\d+)", r" \1 ", text))]


def _mentions(words):
    """[(index, end, name, plural)] of object mentions, longest match first, left to right."""
    found, i = [], 0
    while i < len(words):
        for length in range(min(_LONGEST, len(words) - i), 0, -1):
            key = tuple(words[i:i + length])
            if key in _NAMES:
                found.append((i, i + length, _NAMES[key], key in _PLURAL_FORMS))
                i += length
                break
        else:
            i += 1
    return found


# Words that end the phrase a count can be said in ("two dogs" but not "two cats and dogs").
_COUNT_STOPS = {",", ";", ":", ".", "!", "?", "and", "with", "on", "in", "at", "to", "by", "next", "near", "under",
                "over", "above", "below", "beside"}


def _number_before(words, index):
    """A count said in the few words before a mention ("three", "3", "a pair of", "two happy"), or None."""
    for word in reversed(words[max(0, index - 4):index]):
        if word.isdigit():
            return int(word)
        if word in NUMBERS and word not in ("a", "an"):
            return NUMBERS[word]
        if word in _COUNT_STOPS:
            return None
    return None


_SHADE_WORDS = ("a", "an", "the", "plain", "solid", "bright", "dark", "light")


def _background(words, object_starts):
    """The background colour the text names, or None."""
    colours = [(i, _COLOURS[w]) for i, w in enumerate(words) if w in _COLOURS]
    for i, colour in colours:
        after = words[i + 1:i + 3]
        before = [w for w in words[max(0, i - 3):i] if w not in _SHADE_WORDS]
        if after and (after[0] in PICTURE_WORDS or (after[0] in ("coloured", "colored") and len(after) > 1)):
            return colour
        if before and (before[-1] in ("on", "against", "in", "over") or before[-1] in PICTURE_WORDS
                       or before[-1] in (":", "is")) and i + 1 not in object_starts:
            return colour
    loose = [(i, c) for i, c in colours if i + 1 not in object_starts
             and not (i + 2 in object_starts and words[i + 1] in _SIZES)]
    return loose[0][1] if loose else None


def _intensifier(words, i):
    """Whether words[i] ("right") only stresses a place: "right in the middle", "right at the top"."""
    rest = [w for w in words[i + 1:i + 4] if w not in ("the", "a")]
    return len(rest) >= 2 and rest[0] in ("in", "at", "on") and (rest[1] in CENTRE or rest[1] in VERTICAL)


def _position(words):
    """One of scenes.POSITIONS said anywhere in the text (object names blanked out), or None."""
    vertical = next((VERTICAL[w] for w in words if w in VERTICAL), None) or next(  # "down right", "up left"
        ("top" if w == "up" else "bottom" for w, after in zip(words, words[1:])
         if w in ("up", "down") and after in ("left", "right")), None)
    horizontal = next((w for i, w in enumerate(words) if w == "left" or w == "right" and not _intensifier(words, i)),
                      None)
    if vertical and horizontal:
        return f"{vertical} {horizontal}"
    if vertical or horizontal:
        return vertical or horizontal
    return "center" if any(w in CENTRE for w in words) else None


def _phrase_at(words):
    """(start, end, relation) of the first relation phrase in `words`, or None."""
    for start in range(len(words)):
        for phrase, relation in _PHRASES_LONGEST_FIRST:
            if tuple(words[start:start + len(phrase)]) == phrase:
                return start, start + len(phrase), relation
    return None


def _find_phrase(words):
    found = _phrase_at(words)
    return found and found[2]


_LABELS = SIDES | {"under": "below", "underneath": "below", "beneath": "below"}


def _side_label(words, mention):
    """The side a mention is labelled with ("left: a cat", "cat right,", "a gift underneath"), or None.
    Not the "right" of "from left to right: a pig, a cow", which orders them instead."""
    start, end = mention[0], mention[1]
    before = [w for w in words[max(0, start - 4):start] if w not in ("a", "an", "the")]
    if len(before) >= 2 and before[-1] == ":" and before[-2] in SIDES and before[-3:-2] != ["to"]:
        return SIDES[before[-2]]
    after = [w for w in words[end:end + 4] if w not in ("on", "at", "the")][:2]
    if after and after[0] in _LABELS and (len(after) == 1 or after[1] in (",", ";", ".", ":", "and")):
        return _LABELS[after[0]]
    return None


def _relation(words, first, second):
    """(relation, subject, reference) for two mentions, or None when the text says none."""
    between = words[first[1]:second[0]]
    found = _phrase_at(between)
    if found:
        _, end, relation = found
        if between[end:end + 1] in (["it"], ["them"]):  # "a truck, and below it a car"
            return relation, second[2], first[2]
        return relation, first[2], second[2]  # "a cat to the left of a dog"
    for j, word in enumerate(between[:-1]):  # "a trumpet, to its left a bell"
        if word in ("its", "their") and between[j + 1] in SIDES:
            return SIDES[between[j + 1]], second[2], first[2]
    relation = _find_phrase(words[:first[0]])
    if relation:  # "to the left of a dog, a cat"
        return relation, second[2], first[2]
    after = words[second[1]:]
    for j in range(len(after)):
        relation = _find_phrase(after[j:j + 4])
        if relation and any(w in ("it", "them", "this", "that") for w in after[j + 1:j + 5]):
            return relation, second[2], first[2]  # "a ship with an anchor underneath it"
    if [w for w in words[first[1]:second[0]] if w not in ("a", "an", "the")][-1:] == ["on"]:  # "a cat on a dog"
        return "above", first[2], second[2]
    inside = {j for m in _mentions(after) for j in range(m[0], m[1])}  # the "top" of "top hat" is no side
    # "a cat and a dog, the dog on the left" / "a cat with a dog on its left" / "a cat next to a dog"
    for j, word in enumerate(after):
        said_as_side = word in ("above", "below") or j > 0 and after[j - 1] in ("the", "its", "their", "his", "her")
        if j not in inside and word in SIDES and said_as_side:
            named = _mentions(after[:j])
            subject = named[-1][2] if named else second[2]
            other = first[2] if subject == second[2] else second[2]
            return SIDES[word], subject, other
    for mention in _mentions(words):  # "top: a bird / bottom: a snake", "a cat and a dog: cat right, dog left"
        side = _side_label(words, mention) if mention[2] in (first[2], second[2]) else None
        if side:
            return side, mention[2], second[2] if mention[2] == first[2] else first[2]
    return None  # a side-less phrase ("next to", "and") or none: the caller puts the first on the left


def _default_background(*names) -> str:
    """The first of white, blue, yellow, black (then the rest) that every named object shows on."""
    shown = [b for b in ("white", "blue", "yellow", "black", *scenes.BACKGROUNDS)
             if all(b in scenes.visible_backgrounds(name) for name in names)]
    return shown[0] if shown else "white"


def backdrop(text) -> Image.Image:
    """What the model can draw of a text that names no object it knows: the background alone (the
    colour the text names, else white), as a picture for the sampler to copy."""
    colour = _background(_words(text), set()) or "white"
    return Image.new("RGB", (scenes.IMAGE_SIZE, scenes.IMAGE_SIZE), scenes.BACKGROUNDS[colour])


def read(text) -> str | None:
    """The template caption of the scene `text` describes, or None when it names no known object."""
    words = _words(text)
    mentions = _mentions(words)
    if not mentions:
        return None
    background = _background(words, {m[0] for m in mentions} | {m[0] - 1 for m in mentions if m[0] > 0
                                                                   and words[m[0] - 1] in _SIZES})
    names = list(dict.fromkeys(m[2] for m in mentions))
    first = mentions[0]
    if len(names) == 1:
        count = _number_before(words, first[0])
        if count is None:  # "tulips, four of them", "bees x3"
            count = next((NUMBERS.get(w) or int(w) for w in words[first[1]:] if w.isdigit() and len(w) < 3
                          or w in NUMBERS and w not in ("a", "an", "one", "single")), None)
        if count is None and first[3] and not (first[0] and words[first[0] - 1] in ("a", "an")):  # "a dice"
            count = 2
        count = None if count is None or count < 2 else min(count, 4)
        name = names[0]
        background = background or _default_background(name)
        if count:
            return scenes.template("count", [name], background, count=count)
        free = [w for i, w in enumerate(words) if not any(m[0] <= i < m[1] for m in mentions)]
        size = next((_SIZES[w] for w in free if w in _SIZES), "large")
        return scenes.template("single", [name], background, size_name=size, position=_position(free) or "center")
    second = next(m for m in mentions if m[2] != first[2])
    found = _relation(words, first, second)
    relation, subject, reference = found or ("to the left of", first[2], second[2])
    background = background or _default_background(subject, reference)
    return scenes.template("pair", [subject, reference], background, relation=relation)


# Words that mean one thing: a slip equally near two of them is still read.
_FORMS = ({words[0]: name for words, name in _NAMES.items() if len(words) == 1}
          | {word: f"{size} size" for word, size in _SIZES.items()}
          | {word: f"{colour} colour" for word, colour in _COLOURS.items()})
mend = spelling.Corrector(known_words(), spelling.read_common_words(), _FORMS)
