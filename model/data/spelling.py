"""Typing slips in prompts, mended for the prompt reader (model/data/reading.py).

People type on phones: "girafe", "bannana", "rigth", "backgound". A word the reader does not know is
read as the one word it knows that is a slip away: one edit for words under 7 letters, two from 7
letters on (an edit: a letter dropped, added, wrong, or two neighbours swapped). Never a word of
fewer than 4 letters ("hat" is no "cat"), never a word that is a common English word itself ("near"
is no "pear", "spells" no "shells"): COMMON_WORDS, the English words within that reach of a word the
reader knows (see `common_words`), is shipped in common_words.txt. When two known words are equally
close, the word is left as it is, unless they are forms of one thing ("ghots": "ghost", "ghosts").
"""

from collections.abc import Iterable
from pathlib import Path

MIN_LENGTH = 4
_COMMON_WORDS_FILE = Path(__file__).with_name("common_words.txt")


def reach(word: str) -> int:
    """How many edits a word may be from the known word it is read as."""
    return 1 if len(word) < 7 else 2


def distance(a: str, b: str) -> int:
    """Edits from a to b (optimal string alignment: insert, delete, substitute, swap neighbours)."""
    previous2, previous = None, list(range(len(b) + 1))
    for i in range(1, len(a) + 1):
        row = [i] + [0] * len(b)
        for j in range(1, len(b) + 1):
            row[j] = min(previous[j] + 1, row[j - 1] + 1, previous[j - 1] + (a[i - 1] != b[j - 1]))
            if i > 1 and j > 1 and a[i - 1] == b[j - 2] and a[i - 2] == b[j - 1]:
                row[j] = min(row[j], previous2[j - 2] + 1)
        previous2, previous = previous, row
    return previous[-1]


def _deletions(word: str, depth: int) -> set[str]:
    found, frontier = {word}, {word}
    for _ in range(depth):
        frontier = {w[:i] + w[i + 1:] for w in frontier for i in range(len(w))}
        found |= frontier
    return found


class Corrector:
    """word -> the known word it is a slip of, or the word itself (see the module docstring)."""

    def __init__(self, known: Iterable[str], common: Iterable[str] = (), forms: dict[str, str] | None = None):
        self.known = frozenset(w for w in known if w.isalpha())
        self.common = frozenset(common)
        # Words that mean one thing (a name and its plural, "small" and "smol"): a tie between them is no doubt.
        self.forms = forms or {}
        # Candidates share a deletion with the word (symmetric-delete lookup), then are measured.
        self._by_deletion: dict[str, set[str]] = {}
        for word in self.known:
            for variant in _deletions(word, 2):
                self._by_deletion.setdefault(variant, set()).add(word)

    def candidates(self, word: str) -> list[str]:
        """Known words within reach of `word`, nearest first (ties in alphabetical order)."""
        near = set()
        for variant in _deletions(word, reach(word)):
            near |= self._by_deletion.get(variant, set())
        measured = [(distance(word, w), w) for w in near if w != word]
        return [w for d, w in sorted(measured) if d <= reach(word)]

    def __call__(self, word: str) -> str:
        if len(word) < MIN_LENGTH or not word.isalpha() or word in self.known or word in self.common:
            return word
        found = self.candidates(word)
        if not found:
            return word
        nearest = [w for w in found if distance(word, w) == distance(word, found[0])]
        if len({self.forms.get(w, w) for w in nearest}) > 1:
            return word
        # "ghots" is as near "ghost" as "ghosts": the form that ends as the word does.
        return next((w for w in nearest if (w[-1] == "s") == (word[-1] == "s")), nearest[0])


def read_common_words() -> frozenset[str]:
    return frozenset(_COMMON_WORDS_FILE.read_text().split())


def common_words(known: Iterable[str], english: Iterable[str]) -> list[str]:
    """The words of `english` (a frequency list) that a Corrector over `known` would otherwise change.
    common_words.txt was made with the 50,000 most frequent English words of wordfreq 3.1.1:
        from wordfreq import top_n_list
        common_words(reading.known_words(), top_n_list("en", 50000))
    """
    corrector = Corrector(known)
    return sorted({w for w in english if w.isalpha() and len(w) >= MIN_LENGTH and w not in corrector.known
                   and corrector.candidates(w)})
