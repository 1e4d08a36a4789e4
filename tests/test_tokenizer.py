"""Tests for effml_lib.tokenizer: roundtrips, training against a naive reference, the shipped file."""

import ast
import json
import random
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from effml_lib import data, tokenizer
from effml_lib.tokenizer import (
    EOT,
    PRETOKENIZE_PATTERN,
    Tokenizer,
    load_tokenizer,
    train_bpe,
)

# Characters chosen to stress the byte level: ASCII code, whitespace of every kind, accents,
# combining marks, CJK, 4-byte emoji (incl. a ZWJ sequence), a NUL, a BOM, the replacement char.
ALPHABET = (
    list("abcxyzABC_019 ")
    + list("()[]{}:.,'\"#=+-*/\\@!?<>|")
    + ["\t", "\n", "\r\n", "\r", "\x0b", "\x0c", "    ", "        ", "\u00a0", "\u3000"]
    + ["é", "ß", "e\u0301", "中", "文", "ж", "λ", "\u200b", "\ufeff", "\ufffd", "\x00"]
    + ["😀", "🐍", "👩\u200d💻", "🇫🇷"]
    + ["<|endoftext|>", "<|", "|>", "self", " return", "def "]
)


def random_strings(seed: int, n: int, max_len: int = 40) -> list[str]:
    rng = random.Random(seed)
    return ["".join(rng.choice(ALPHABET) for _ in range(rng.randrange(max_len))) for _ in range(n)]


@pytest.fixture(scope="module")
def shipped() -> Tokenizer:
    return load_tokenizer()


@pytest.fixture(scope="module")
def small_corpus() -> list[str]:
    """A small but varied training corpus: a few real modules plus synthetic texts with ties."""
    root = data.stdlib_root()
    texts = [(root / name).read_text(encoding="utf-8")[:6000] for name in ("bisect.py", "colorsys.py")]
    texts += [Path(__file__).read_text(encoding="utf-8")[:4000]]
    synthetic = ["aaaa aaa aa a abab abab ababab", "ünïcödé 中文 中文中文 😀😀 🐍", "x\r\ny\r\n\r\n\tz"]
    texts += synthetic * 3  # overlapping pairs ("aaaa"), multi-byte characters, CRLF
    return texts


# --- a slow, obviously-correct reference ---------------------------------------------------------


def naive_train(texts, vocab_size, pattern=PRETOKENIZE_PATTERN):
    """Recount every pair after every merge; pick the highest count, ties to the smallest pair."""
    counts = Counter()
    for t in texts:
        for chunk in t.split(EOT):
            counts.update(re.findall(pattern, chunk))
    words = {tuple(w.encode("utf-8")): c for w, c in counts.items()}
    merges = []
    for new_id in range(256, vocab_size - 1):
        pair_counts = Counter()
        for w, c in words.items():
            for p in zip(w, w[1:]):
                pair_counts[p] += c
        if not pair_counts:
            break
        best = min(pair_counts, key=lambda p: (-pair_counts[p], p))
        merges.append(best)
        merged = Counter()
        for w, c in words.items():
            merged[tuple(naive_merge(list(w), best, new_id))] += c
        words = merged
    return merges


def naive_merge(ids, pair, new_id):
    out, i = [], 0
    while i < len(ids):
        if i + 1 < len(ids) and (ids[i], ids[i + 1]) == pair:
            out.append(new_id)
            i += 2
        else:
            out.append(ids[i])
            i += 1
    return out


def naive_encode(merges, text, pattern=PRETOKENIZE_PATTERN):
    """Apply every merge, in rank order, to each pre-token (no special tokens)."""
    out = []
    for piece in re.findall(pattern, text):
        ids = list(piece.encode("utf-8"))
        for rank, pair in enumerate(merges):
            ids = naive_merge(ids, pair, 256 + rank)
        out.extend(ids)
    return out


# --- pre-tokenisation ----------------------------------------------------------------------------


def test_pretokenize_tiles_the_text(shipped):
    for s in random_strings(0, 300) + ["", " ", "\r", "\n\n\n", "   \t  x", "a\u0301"]:
        assert "".join(shipped.pretokenize(s)) == s


def test_pretokenize_code_pieces(shipped):
    code = "def f(x):\n        return x == 1  \n\n"
    assert shipped.pretokenize(code) == [
        "def", " f", "(", "x", "):", "\n",
        "       ", " return", " x", " ==", " 1", "  ", "\n\n",
    ]


# --- encode / decode -----------------------------------------------------------------------------


def test_roundtrip_random_strings(shipped):
    for s in random_strings(1, 500):
        ids = shipped.encode(s)
        assert all(isinstance(i, int) and 0 <= i < shipped.vocab_size for i in ids)
        assert shipped.decode(ids) == s
        assert shipped.decode(shipped.encode(s, allow_special=False)) == s


def test_roundtrip_edge_cases(shipped):
    for s in ["", "\r\n", "\t\tx\r\n", "😀", "👩\u200d💻", "\x00", " " * 1000, "é" * 300, EOT * 3]:
        assert shipped.decode(shipped.encode(s)) == s
    assert shipped.encode("") == []
    assert shipped.decode([]) == ""


def test_decode_accepts_tensors(shipped):
    torch = pytest.importorskip("torch")
    ids = shipped.encode("import os\n")
    assert shipped.decode(torch.tensor(ids)) == "import os\n"


def test_partial_utf8_is_replaced(shipped):
    snake = "🐍".encode("utf-8")  # 4 bytes
    assert shipped.decode([snake[0], snake[1]]) == "\ufffd"
    assert shipped.decode(list(snake)) == "🐍"


def test_special_token(shipped):
    eot = shipped.eot_id
    ids = shipped.encode(f"a = 1\n{EOT}b = 2\n")
    assert ids.count(eot) == 1
    assert shipped.decode(ids) == f"a = 1\n{EOT}b = 2\n"
    assert shipped.encode(EOT) == [eot]
    # Not allowed: the same text is spelled with ordinary tokens, and still roundtrips.
    plain = shipped.encode(EOT, allow_special=False)
    assert eot not in plain and len(plain) > 1
    assert shipped.decode(plain) == EOT
    assert shipped.token_bytes(eot) == EOT.encode()


def test_input_validation(shipped):
    with pytest.raises(TypeError, match="text"):
        shipped.encode(b"bytes")
    with pytest.raises(TypeError, match="text"):
        shipped.encode(None)
    with pytest.raises(ValueError, match=r"4096.*0\.\.4095"):
        shipped.decode([1, 2, 4096])
    with pytest.raises(ValueError, match=r"-1.*0\.\.4095"):
        shipped.decode([-1])
    with pytest.raises(TypeError, match="integer"):
        shipped.decode([1.5])
    with pytest.raises(TypeError):
        shipped.decode("abc")
    with pytest.raises(ValueError, match="4096"):
        shipped.token_bytes(4096)


def test_token_bytes_compose(shipped):
    for rank, (a, b) in enumerate(shipped.merges):
        assert shipped.token_bytes(256 + rank) == shipped.token_bytes(a) + shipped.token_bytes(b)
    assert shipped.token_bytes(65) == b"A"


# --- training ------------------------------------------------------------------------------------


def test_train_matches_naive_reference(small_corpus):
    vocab_size = 256 + 1 + 300
    fast = train_bpe(small_corpus, vocab_size, progress=False)
    assert fast.merges == naive_train(small_corpus, vocab_size)
    assert fast.vocab_size == vocab_size and fast.eot_id == vocab_size - 1


def test_encoder_matches_naive_reference(small_corpus):
    tok = train_bpe(small_corpus, 256 + 1 + 300, progress=False)
    texts = small_corpus + random_strings(2, 100)
    root = data.stdlib_root()
    texts.append((root / "heapq.py").read_text(encoding="utf-8")[:5000])  # text not trained on
    for t in texts:
        assert tok.encode(t, allow_special=False) == naive_encode(tok.merges, t)


def test_shipped_encoder_matches_naive_reference(shipped):
    text = (data.stdlib_root() / "keyword.py").read_text(encoding="utf-8")[:3000]
    text += "".join(random_strings(3, 20))
    assert shipped.encode(text, allow_special=False) == naive_encode(shipped.merges, text)


def test_train_is_deterministic_and_order_independent(small_corpus):
    a = train_bpe(small_corpus, 400, progress=False)
    b = train_bpe(list(reversed(small_corpus)), 400, progress=False)
    assert a.merges == b.merges and a.digest == b.digest


def test_train_stops_when_pairs_run_out():
    tok = train_bpe(["aaaa", "ab"], 1000, progress=False)
    assert tok.merges == naive_train(["aaaa", "ab"], 1000)
    assert tok.vocab_size < 1000 and tok.eot_id == tok.vocab_size - 1
    assert tok.decode(tok.encode("aaaa ab")) == "aaaa ab"


def test_train_ignores_special_token():
    tok = train_bpe([f"x{EOT}y"] * 5, 300, progress=False)
    assert all(b"<|" not in tok.token_bytes(i) for i in range(tok.eot_id))


def test_train_validation():
    with pytest.raises(ValueError, match="vocab_size"):
        train_bpe(["abc"], 100, progress=False)
    with pytest.raises(TypeError, match="vocab_size"):
        train_bpe(["abc"], 300.0, progress=False)
    with pytest.raises(TypeError, match="iterable of str"):
        train_bpe("abc", 300, progress=False)


# --- persistence ---------------------------------------------------------------------------------


def test_save_load_roundtrip(tmp_path, small_corpus):
    tok = train_bpe(small_corpus, 350, name="tiny", progress=False, metadata={"note": "test"})
    path = tok.save(tmp_path / "tiny.json")
    back = Tokenizer.load(path)
    assert back.merges == tok.merges and back.name == "tiny" and back.metadata == {"note": "test"}
    assert back.digest == tok.digest
    text = small_corpus[0]
    assert back.encode(text) == tok.encode(text)


def test_load_rejects_bad_files(tmp_path):
    with pytest.raises(FileNotFoundError):
        Tokenizer.load(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"format": "something-else"}))
    with pytest.raises(ValueError, match="effml-bpe"):
        Tokenizer.load(bad)
    with pytest.raises(ValueError, match="merges"):
        Tokenizer([(256, 1)])  # id 256 does not exist before the first merge
    with pytest.raises(FileNotFoundError, match="python -m effml_lib.tokenizer train"):
        load_tokenizer("no-such-tokenizer")


# --- the shipped tokenizer -----------------------------------------------------------------------


def test_shipped_tokenizer(shipped):
    assert shipped.name == "effml-bpe-4096"
    assert shipped.vocab_size == 4096 and shipped.eot_id == 4095
    assert len(shipped.merges) == 4096 - 256 - 1
    assert shipped.pattern == PRETOKENIZE_PATTERN
    path = Path(__file__).resolve().parents[1] / "effml_lib/assets/tokenizer/effml-bpe-4096.json"
    assert path.stat().st_size < 1_000_000


def test_shipped_tokenizer_compresses_code(shipped):
    root = data.stdlib_root()
    # Held-out modules (never seen in training) that exist in Python 3.10-3.13.
    names = ["gettext.py", "optparse.py", "socket.py", "pkgutil.py"]
    assert all(data.split_of(n) == "heldout" for n in names)
    text = "".join((root / n).read_text(encoding="utf-8") for n in names)
    n_bytes = len(text.encode("utf-8"))
    ratio = n_bytes / len(shipped.encode(text, allow_special=False))
    assert 2.8 < ratio < 5.0, f"{ratio:.2f} bytes/token"
    # Common Python words are single tokens.
    for word in [" self", " return", "def", " import", "    "]:
        assert len(shipped.encode(word)) == 1, word


# --- imports: data imports the tokenizer, never the reverse ------------------------------------------

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("module, loaded", [
    ("effml_lib.tokenizer", ["effml_lib", "effml_lib.tokenizer"]),
    ("effml_lib.data", ["effml_lib", "effml_lib.data", "effml_lib.tokenizer"]),
])
def test_module_imports_alone(module, loaded):
    code = f"import sys, {module}; print(sorted(m for m in sys.modules if m.split('.')[0] == 'effml_lib'))"
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"import {module} in a fresh interpreter failed:\n{done.stderr}"
    assert ast.literal_eval(done.stdout.strip()) == loaded, f"import {module} loaded {done.stdout.strip()}"


def effml_imports(path: Path) -> list[str]:
    """What ``path`` imports from effml_lib anywhere (functions included) but its ``__main__`` block."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    main = [n for n in tree.body if isinstance(n, ast.If) and ast.unparse(n.test) == "__name__ == '__main__'"]
    skip = {id(n) for block in main for n in ast.walk(block)}
    found = []
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            found += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            module = "effml_lib" + (f".{node.module}" if node.module else "") if node.level else node.module
            found += [f"{module}.{a.name}" for a in node.names]
    return [m for m in found if m.split(".")[0] == "effml_lib"]


def test_tokenizer_imports_nothing_of_effml_lib():
    # Not even inside a function: the corpus-reading command lives in data (data.tokenizer_cli);
    # only the __main__ block of ``python -m effml_lib.tokenizer`` hands over to it.
    found = effml_imports(Path(tokenizer.__file__))
    assert found == [], f"effml_lib/tokenizer.py imports {found}: data imports the tokenizer, so this is a circle"


def test_tokenizer_command_runs_the_data_cli():
    done = subprocess.run([sys.executable, "-m", "effml_lib.tokenizer", "train", "--help"], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "usage: python -m effml_lib.tokenizer train" in done.stdout and "--vocab-size" in done.stdout
