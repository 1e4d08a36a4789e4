"""A byte-level BPE tokenizer, written out in full so the course can read every line.

Byte-pair encoding (Sennrich et al. 2016; byte-level as in GPT-2) in three ideas:

1. **Bytes are the alphabet.** Any text is UTF-8 bytes, so ids 0..255 can spell anything: no unknown
   token, ever, and ``decode(encode(s)) == s`` for every string.
2. **Merges are learned.** Training repeatedly finds the most frequent adjacent pair of ids in the
   corpus and gives it a new id (256, 257, ...). The ordered list of merges *is* the tokenizer.
3. **Pre-tokenisation bounds merges.** Text is first cut by a regex into pieces (words, runs of
   punctuation, whitespace) and BPE runs inside each piece only, so a token never spans, say, the
   end of an identifier and the following ``(``. This keeps tokens meaningful and makes encoding
   cacheable: the same piece always gives the same ids.

On top of the ``256 + n_merges`` ordinary tokens there is one special token, ``<|endoftext|>``, the
last id, which separates documents in the training stream.

API::

    tok = load_tokenizer()                    # the shipped effml-bpe-4096
    ids = tok.encode("def f(x):\\n    return x")   # list[int]
    tok.decode(ids)                           # back to the same str
    tok = train_bpe(texts, vocab_size=4096)   # learn merges from an iterable of str
    tok.save(path); Tokenizer.load(path)

Rebuild the shipped file (~15 s on a 2-core CPU; docs/DATA.md); the recipe, BPE on the corpus' train
split, is ``effml_lib.data.train_tokenizer``::

    python -m effml_lib.tokenizer train
"""

from __future__ import annotations

import hashlib
import heapq
import json
import operator
import re
import sys
from collections import Counter
from collections.abc import Iterable
from pathlib import Path

from tqdm.auto import tqdm

__all__ = [
    "EOT",
    "PRETOKENIZE_PATTERN",
    "Tokenizer",
    "train_bpe",
    "load_tokenizer",
    "DEFAULT_TOKENIZER",
]

# The one special token: separates documents (here: source files) in the token stream.
EOT = "<|endoftext|>"

DEFAULT_TOKENIZER = "effml-bpe-4096"
ASSETS_DIR = Path(__file__).resolve().parent / "assets" / "tokenizer"

# Pre-tokenisation, tuned for Python source. Alternatives are tried left to right at each position:
#
#   ` ?\w+`             a run of letters/digits/underscore (an identifier, keyword or number), with at
#                       most one leading space attached, as in GPT-2: " return", " self", " 0x1F".
#                       Attaching the space means "x = y" costs 3 pieces ("x", " =", " y"), not 5.
#   ` ?[^\w\s]+`        a run of punctuation, again with one optional leading space: "):", " ==",
#                       '"""', " #", "['". Emoji and other symbols land here too.
#   `(?:\r?\n)+`        one or more line breaks (blank lines included), kept apart from indentation.
#   `[^\S\r\n]+(?!\S)`  a run of horizontal whitespace (spaces, tabs) not directly followed by text:
#                       trailing spaces, or an indentation run minus its last space (the regex backs
#                       off one character), which ` ?\w+` then takes along with the word. So 8 spaces
#                       of indentation + "return" become "       " + " return": the long run stays
#                       one piece, and the word keeps its usual " return" form.
#   `\s`                any single whitespace left over (a tab before a word, a lone "\r").
#
# Every character is \w, \s or neither, and each class has an alternative that matches it, so the
# pieces always tile the text exactly (tests check ``"".join(pieces) == text``). We use the standard
# library's `re` (not the `regex` package), so there is no Unicode \p{L}; Python's \w is already
# Unicode-aware (letters and digits of every script, plus "_").
PRETOKENIZE_PATTERN = r" ?\w+| ?[^\w\s]+|(?:\r?\n)+|[^\S\r\n]+(?!\S)|\s"

# Encoding caches the ids of each distinct piece. Code repeats itself ("self", "    ", " return"),
# so the cache makes encoding ~20x faster. The cap keeps memory bounded on adversarial input:
# once full, new pieces are still encoded, just not remembered.
_CACHE_LIMIT = 1 << 20

_FORMAT = "effml-bpe"
_FORMAT_VERSION = 1


class Tokenizer:
    """A byte-level BPE tokenizer: 256 byte tokens, then one token per merge, then ``<|endoftext|>``.

    ``merges[r] = (a, b)`` means: the pair of ids (a, b) is replaced by id ``256 + r``; a lower ``r``
    (rank) was learned earlier and is applied first.
    """

    def __init__(
        self,
        merges: Iterable[tuple[int, int]],
        *,
        name: str = "custom",
        pattern: str = PRETOKENIZE_PATTERN,
        metadata: dict | None = None,
    ):
        self.name = str(name)
        self.pattern = pattern
        self.metadata = dict(metadata or {})
        self._regex = re.compile(pattern)

        self.merges: list[tuple[int, int]] = []
        self._ranks: dict[tuple[int, int], int] = {}  # (a, b) -> rank r; new id is 256 + r
        # _vocab[i] = the bytes token i stands for; merged tokens are the concatenation of their parts.
        self._vocab: list[bytes] = [bytes([i]) for i in range(256)]
        for rank, pair in enumerate(merges):
            a, b = (int(x) for x in pair)
            new_id = 256 + rank
            # A merge may only use tokens that exist before it: bytes and earlier merges.
            if not (0 <= a < new_id and 0 <= b < new_id):
                raise ValueError(
                    f"merges[{rank}] = ({a}, {b}) refers to an id outside 0..{new_id - 1}; "
                    "a merge may only combine bytes and earlier merges"
                )
            if (a, b) in self._ranks:
                raise ValueError(f"merges[{rank}] = ({a}, {b}) repeats merges[{self._ranks[(a, b)]}]")
            self.merges.append((a, b))
            self._ranks[(a, b)] = rank
            self._vocab.append(self._vocab[a] + self._vocab[b])
        self._eot_id = 256 + len(self.merges)
        self._cache: dict[str, list[int]] = {}

    # --- sizes and ids -------------------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        """Number of ids: 256 bytes + merges + 1 special token."""
        return self._eot_id + 1

    @property
    def eot_id(self) -> int:
        """Id of ``<|endoftext|>``, the document separator (always the last id)."""
        return self._eot_id

    @property
    def digest(self) -> str:
        """Short sha256 of pattern + merges: two tokenizers with the same digest encode identically."""
        h = hashlib.sha256(self.pattern.encode("utf-8"))
        h.update(json.dumps(self.merges).encode("ascii"))
        return h.hexdigest()[:12]

    def token_bytes(self, id: int) -> bytes:
        """The bytes token ``id`` stands for (``b"<|endoftext|>"`` for the special token)."""
        id = self._check_id(id)
        return EOT.encode("utf-8") if id == self._eot_id else self._vocab[id]

    def _check_id(self, id) -> int:
        try:
            i = operator.index(id)  # accepts int, numpy ints, 0-d integer tensors; rejects floats
        except TypeError:
            raise TypeError(f"token id must be an integer, got {type(id).__name__}: {id!r}") from None
        if not 0 <= i < self.vocab_size:
            raise ValueError(f"token id {i} is out of range: valid ids are 0..{self.vocab_size - 1}")
        return i

    # --- encoding ------------------------------------------------------------------------------

    def pretokenize(self, text: str) -> list[str]:
        """Cut ``text`` into the pieces BPE runs on (they concatenate back to ``text``)."""
        return self._regex.findall(text)

    def _bpe(self, piece: bytes) -> list[int]:
        """BPE one piece: repeatedly merge the adjacent pair with the lowest rank until none is left."""
        ids = list(piece)
        ranks = self._ranks
        while len(ids) >= 2:
            # The pair learned earliest among the pairs present (rank = order of learning).
            best_rank = None
            for pair in zip(ids, ids[1:]):
                r = ranks.get(pair)
                if r is not None and (best_rank is None or r < best_rank):
                    best_rank = r
            if best_rank is None:
                break
            a, b = self.merges[best_rank]
            new_id = 256 + best_rank
            # Replace every occurrence, left to right (so "aaa" with merge (a, a) -> [aa, a]),
            # exactly as training applied it.
            ids = _merge_word(ids, a, b, new_id)
        return ids

    def _encode_ordinary(self, text: str, out: list[int]) -> None:
        cache = self._cache
        for piece in self._regex.findall(text):
            ids = cache.get(piece)
            if ids is None:
                ids = self._bpe(piece.encode("utf-8"))
                if len(cache) < _CACHE_LIMIT:
                    cache[piece] = ids
            out.extend(ids)

    def encode(self, text: str, allow_special: bool = True) -> list[int]:
        """Text -> token ids.

        With ``allow_special=True`` the literal string ``<|endoftext|>`` becomes the single id
        ``eot_id``; with ``False`` it is encoded as ordinary text (use that for untrusted input,
        so a document cannot forge a document boundary).
        """
        if not isinstance(text, str):
            raise TypeError(f"encode(text=...) expects a str, got {type(text).__name__}")
        out: list[int] = []
        if not allow_special:
            self._encode_ordinary(text, out)
            return out
        for k, chunk in enumerate(text.split(EOT)):
            if k:  # a separator stood between this chunk and the previous one
                out.append(self._eot_id)
            self._encode_ordinary(chunk, out)
        return out

    def decode(self, ids: Iterable[int]) -> str:
        """Token ids -> text. Bytes that are not valid UTF-8 (e.g. a cut in the middle of a character)
        become U+FFFD rather than an error, so decoding any prefix of a generation works."""
        if isinstance(ids, (str, bytes)):
            raise TypeError(f"decode(ids=...) expects a sequence of ints, got {type(ids).__name__}")
        if hasattr(ids, "tolist"):  # torch tensors and numpy arrays: one fast conversion
            ids = ids.tolist()
            if isinstance(ids, int):
                ids = [ids]
        return b"".join(self.token_bytes(i) for i in ids).decode("utf-8", errors="replace")

    # --- persistence ---------------------------------------------------------------------------

    def save(self, path) -> Path:
        """Write the tokenizer as JSON: one merge per line, so diffs stay readable (~50 KB for 4096)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        header = {
            "format": _FORMAT,
            "version": _FORMAT_VERSION,
            "name": self.name,
            "pattern": self.pattern,
            "special_tokens": {EOT: self._eot_id},
            "vocab_size": self.vocab_size,
            "metadata": self.metadata,
        }
        head = json.dumps(header, indent=1, ensure_ascii=True)[:-2]  # drop the closing "\n}"
        body = ",\n".join(f"  [{a}, {b}]" for a, b in self.merges)
        path.write_text(f'{head},\n "merges": [\n{body}\n ]\n}}\n', encoding="utf-8")
        return path

    @classmethod
    def load(cls, path) -> "Tokenizer":
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"no tokenizer file at {path}")
        data = json.loads(path.read_text(encoding="utf-8"))
        if data.get("format") != _FORMAT or data.get("version") != _FORMAT_VERSION:
            raise ValueError(
                f"{path} is not an {_FORMAT} v{_FORMAT_VERSION} tokenizer file "
                f"(format={data.get('format')!r}, version={data.get('version')!r})"
            )
        tok = cls(
            [tuple(m) for m in data["merges"]],
            name=data["name"],
            pattern=data["pattern"],
            metadata=data.get("metadata"),
        )
        if tok.vocab_size != data["vocab_size"] or data["special_tokens"] != {EOT: tok.eot_id}:
            raise ValueError(f"{path}: vocab_size/special_tokens do not match the merges (corrupt file?)")
        return tok

    def __repr__(self) -> str:
        return f"Tokenizer(name={self.name!r}, vocab_size={self.vocab_size}, merges={len(self.merges)})"


# --- training ------------------------------------------------------------------------------------


def _pairs(word) -> list[tuple[int, int]]:
    return list(zip(word, word[1:]))


def _merge_word(word: list[int], a: int, b: int, new_id: int) -> list[int]:
    """Replace every (a, b) in ``word`` by ``new_id``, left to right (same rule as encoding)."""
    out, i, n = [], 0, len(word)
    while i < n:
        if i < n - 1 and word[i] == a and word[i + 1] == b:
            out.append(new_id)
            i += 2
        else:
            out.append(word[i])
            i += 1
    return out


def train_bpe(
    texts: Iterable[str],
    vocab_size: int,
    *,
    name: str = "custom",
    pattern: str = PRETOKENIZE_PATTERN,
    progress: bool = True,
    metadata: dict | None = None,
) -> Tokenizer:
    """Learn ``vocab_size - 257`` merges from ``texts`` (256 byte ids and ``<|endoftext|>`` are fixed).

    1. Count how often each distinct pre-token ("word") occurs. BPE never crosses a word boundary,
       so the corpus is just ``{word: count}``: ~73k distinct words for the stdlib, not ~10M bytes.
    2. Count every adjacent pair of ids, weighted by word count, and remember which words contain
       each pair (``where[pair]``).
    3. Repeat: take the most frequent pair (ties: the smallest ``(a, b)``, so every run and machine
       gives the same merges), give it the next id, and rewrite only the words in ``where[pair]``,
       updating the pair counts of those words incrementally. Recounting everything per merge would
       be ~4000 passes over the corpus; this touches only what changed.

    The best pair is found with a heap of ``(-count, pair)`` entries. Counts change constantly, so
    instead of updating entries in place we push a fresh entry on every change and, when popping,
    skip entries whose count is stale ("lazy deletion").

    If the corpus runs out of pairs first, the tokenizer is smaller than ``vocab_size``.
    """
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int):
        raise TypeError(f"vocab_size must be an int, got {type(vocab_size).__name__}")
    if vocab_size < 257:
        raise ValueError(f"vocab_size must be >= 257 (256 bytes + {EOT}), got {vocab_size}")
    if isinstance(texts, str):
        raise TypeError("texts must be an iterable of str (documents), not a single str")
    n_merges = vocab_size - 257
    regex = re.compile(pattern)

    # 1. word frequencies. The special token never takes part in training: cut it out.
    word_counts: Counter[str] = Counter()
    for text in texts:
        if not isinstance(text, str):
            raise TypeError(f"texts must yield str, got {type(text).__name__}")
        for chunk in text.split(EOT):
            word_counts.update(regex.findall(chunk))

    # Sort for a deterministic word order (Counter order depends on the order texts came in).
    items = sorted(word_counts.items())
    words: list[list[int]] = [list(w.encode("utf-8")) for w, _ in items]  # word index -> ids
    freqs: list[int] = [c for _, c in items]  # word index -> occurrences in the corpus

    # 2. pair counts and the pair -> words index.
    counts: dict[tuple[int, int], int] = {}
    where: dict[tuple[int, int], set[int]] = {}
    for w, word in enumerate(words):
        f = freqs[w]
        for p in _pairs(word):
            counts[p] = counts.get(p, 0) + f
            where.setdefault(p, set()).add(w)
    heap = [(-c, p) for p, c in counts.items()]
    heapq.heapify(heap)

    # 3. merge loop.
    merges: list[tuple[int, int]] = []
    bar = tqdm(total=n_merges, desc=f"BPE merges ({name})", disable=not progress, unit="merge")
    while len(merges) < n_merges:
        # Pop until an entry agrees with the live count (others are stale leftovers).
        best = None
        while heap:
            neg_c, p = heapq.heappop(heap)
            if counts.get(p, 0) == -neg_c and -neg_c > 0:
                best = p
                break
        if best is None:
            break  # no pair occurs any more: every word is a single token
        a, b = best
        new_id = 256 + len(merges)
        merges.append(best)

        changed: set[tuple[int, int]] = set()
        for w in sorted(where.pop(best)):  # sorted: deterministic, though counts don't depend on it
            old, f = words[w], freqs[w]
            new = _merge_word(old, a, b, new_id)
            old_pairs, new_pairs = _pairs(old), _pairs(new)
            # Remove the old word's pairs, add the new word's pairs (both weighted by frequency).
            for p in old_pairs:
                counts[p] -= f
                changed.add(p)
            for p in new_pairs:
                counts[p] = counts.get(p, 0) + f
                changed.add(p)
            old_set, new_set = set(old_pairs), set(new_pairs)
            for p in old_set - new_set:
                if p != best:
                    where[p].discard(w)
            for p in new_set - old_set:
                where.setdefault(p, set()).add(w)
            words[w] = new
        counts.pop(best, None)  # all occurrences merged (its count is now 0)
        changed.discard(best)
        for p in changed:
            c = counts[p]
            if c > 0:
                heapq.heappush(heap, (-c, p))
            else:  # keep the tables small: a pair that no longer occurs is forgotten
                del counts[p]
                where.pop(p, None)
        bar.update(1)
    bar.close()
    return Tokenizer(merges, name=name, pattern=pattern, metadata=metadata)


# --- the shipped tokenizer -----------------------------------------------------------------------


def load_tokenizer(name: str = DEFAULT_TOKENIZER) -> Tokenizer:
    """Load a tokenizer shipped in ``effml_lib/assets/tokenizer/<name>.json``."""
    path = ASSETS_DIR / f"{name}.json"
    if not path.is_file():
        shipped = sorted(p.stem for p in ASSETS_DIR.glob("*.json")) if ASSETS_DIR.is_dir() else []
        raise FileNotFoundError(
            f"no shipped tokenizer named {name!r} (looked for {path}); shipped: {shipped or 'none'}. "
            "Rebuild the default one with: python -m effml_lib.tokenizer train"
        )
    return Tokenizer.load(path)


if __name__ == "__main__":
    # ``python -m effml_lib.tokenizer train|info``: the command reads the corpus, so it lives in
    # effml_lib.data (which imports this module, never the reverse); run as a program, this file hands
    # over to it. Importing effml_lib.tokenizer imports nothing of effml_lib (tests/test_tokenizer.py).
    from effml_lib.data import tokenizer_cli

    sys.exit(tokenizer_cli())
