"""The course corpus: the Python standard library's own source code, read from the running interpreter.

Why this corpus:
- **offline**: every Python installation (laptop, CI, Colab) already has it; nothing to download;
- **license-clean**: we commit no third-party text, only the *recipe* (which files, which split);
- **deterministic**: the same Python version gives the same bytes, and every result can name what
  it was measured on with :func:`corpus_fingerprint`;
- **big enough** for a 10-20M-parameter model to learn real structure (~29 MB, ~9.0M tokens with the test suites).

Other Python versions give a slightly different corpus (modules added, removed, edited); a module
lands in the same split on every version because the split hashes its path, not its position.

API::

    files = corpus_files()                      # sorted relative paths, e.g. "asyncio/events.py"
    split_of("json/decoder.py")                 # "train" or "heldout" (~5%)
    texts = read_corpus("train")                # list[str], one per file, in path order
    corpus_fingerprint("heldout")               # short sha256: what a result was measured on
    tokens = load_tokens("train")               # 1-D int64 tensor, EOT after each file, cached
    x, y = random_batches(tokens, 8, 256, g)    # (8, 256) each, y = x shifted by one
    for x, y in sequential_batches(heldout, 8, 256): ...   # every token exactly once
    tok = train_tokenizer(4096)                 # the course tokenizer's recipe: BPE on the train split

Print the corpus statistics with ``python -m effml_lib.data``. The tokenizer's command,
``python -m effml_lib.tokenizer train|info``, is :func:`tokenizer_cli` here: it reads the corpus, and
this module imports the tokenizer, not the reverse.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sys
import sysconfig
import time
from collections.abc import Iterator
from pathlib import Path

import torch
from tqdm.auto import tqdm

from effml_lib.tokenizer import ASSETS_DIR, DEFAULT_TOKENIZER, Tokenizer, load_tokenizer, train_bpe

__all__ = [
    "stdlib_root",
    "corpus_files",
    "split_of",
    "read_corpus",
    "corpus_fingerprint",
    "load_tokens",
    "random_batches",
    "sequential_batches",
    "train_tokenizer",
    "HELDOUT_FRACTION",
]

SPLITS = ("train", "heldout")
HELDOUT_FRACTION = 0.05
MAX_FILE_BYTES = 1_000_000

# A .py file is left out when any directory on its path has one of these names:
# The stdlib's own test suites (test/, unittest/test/, idlelib/idle_test/...) are kept, for training
# only: they nearly triple the training text, which a 17M-parameter model needs (library code alone,
# ~2.9M tokens, is overfitted within a few epochs). They never enter the held-out split, because
# Debian/Ubuntu (and so Colab) install few of them: held-out = library code, present everywhere.
TEST_DIRS = frozenset({"test", "tests", "idle_test"})
EXCLUDED_DIRS = frozenset({
    "site-packages", "dist-packages",  # third-party packages: differ per machine, not the stdlib
    "__pycache__",                     # bytecode caches (no .py there, but never look)
})
# ... or when it is generated rather than written, or depends on the machine that built Python:
EXCLUDED_FILES = frozenset({
    "pydoc_data/topics.py",  # ~750 KB of English help text dumped from the docs by Sphinx
})
EXCLUDED_PREFIXES = (
    "config-",          # config-3.11-x86_64-linux-gnu/python-config.py: build paths of this machine
    "_sysconfigdata_",  # build flags and absolute paths of the machine Python was compiled on
)
# encodings/cp1252.py and ~60 others are character tables written by Tools/unicode/gencodec.py;
# their first line says so. ~1.2 MB of "'\xe9'  #  0xE9 -> LATIN SMALL LETTER E WITH ACUTE".
GENERATED_MARKER = b"gencodec.py"


def stdlib_root() -> Path:
    """The running interpreter's standard-library directory (in a venv: the base install's)."""
    return Path(sysconfig.get_paths()["stdlib"])


def _excluded_path(rel: str) -> bool:
    parts = rel.split("/")
    if any(p in EXCLUDED_DIRS for p in parts[:-1]):
        return True
    return rel in EXCLUDED_FILES or any(p.startswith(EXCLUDED_PREFIXES) for p in parts)


def _excluded_content(data: bytes) -> bool:
    if len(data) > MAX_FILE_BYTES:
        return True
    first_line = data.split(b"\n", 1)[0]
    if GENERATED_MARKER in first_line:
        return True
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return True
    return False


def _root(root) -> Path:
    root = stdlib_root() if root is None else Path(root)
    if not root.is_dir():
        raise ValueError(f"root={str(root)!r} is not a directory")
    return root


def corpus_files(root=None) -> list[str]:
    """Sorted relative POSIX paths of the corpus' ``.py`` files under ``root`` (default: the stdlib).

    Excluded: third-party directories, machine-specific and generated files, files over
    1 MB and files that are not valid UTF-8 (see the constants above for each reason).
    """
    root = _root(root)
    found = []
    # os.walk without following symlinks: a link to site-packages must not pull it in.
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in EXCLUDED_DIRS]  # don't even descend
        for fname in filenames:
            if not fname.endswith(".py"):
                continue
            path = Path(dirpath, fname)
            rel = path.relative_to(root).as_posix()
            if _excluded_path(rel) or not path.is_file():
                continue
            if path.stat().st_size > MAX_FILE_BYTES or _excluded_content(path.read_bytes()):
                continue
            found.append(rel)
    return sorted(found)


def split_of(relpath: str) -> str:
    """``"heldout"`` for ~5% of library files, else ``"train"``, decided by a sha256 of the relative path.

    Files of the stdlib's test suites are always ``"train"``.

    A stable hash (not Python's ``hash``, which is salted per process) makes the split the same on
    every run, machine and Python version; hashing the path, not counting files, means a module
    added in a new Python version does not shift other modules between splits.
    """
    if not isinstance(relpath, str):
        raise TypeError(f"relpath must be a str, got {type(relpath).__name__}")
    if any(part in TEST_DIRS for part in relpath.split("/")[:-1]):
        return "train"  # test suites are missing on many installs: never held out (see TEST_DIRS)
    digest = hashlib.sha256(b"effml-split-v1:" + relpath.encode("utf-8")).digest()
    u = int.from_bytes(digest[:8], "big") / 2**64  # uniform in [0, 1)
    return "heldout" if u < HELDOUT_FRACTION else "train"


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")


def _split_files(split: str, root) -> list[str]:
    _check_split(split)
    return [f for f in corpus_files(root) if split_of(f) == split]


def read_corpus(split: str, root=None) -> list[str]:
    """The documents (file contents, exact bytes decoded as UTF-8) of one split, in path order."""
    root = _root(root)
    # read_bytes + decode, not read_text: text mode would translate "\r\n", changing the bytes.
    return [(root / f).read_bytes().decode("utf-8") for f in _split_files(split, root)]


def corpus_fingerprint(split: str, root=None) -> str:
    """A short sha256 over the paths and contents of one split: equal fingerprints, equal data."""
    root = _root(root)
    h = hashlib.sha256(f"effml-corpus-v1:{split}\n".encode())
    for f in _split_files(split, root):
        data = (root / f).read_bytes()
        # Length-prefix both fields so no two different corpora hash the same byte stream.
        name = f.encode("utf-8")
        h.update(len(name).to_bytes(8, "big") + name + len(data).to_bytes(8, "big") + data)
    return h.hexdigest()[:16]


def _cache_dir(cache_dir) -> Path:
    if cache_dir is not None:
        return Path(cache_dir)
    return Path(os.environ.get("EFFML_CACHE") or Path.home() / ".cache" / "effml")


def load_tokens(
    split: str,
    tokenizer: Tokenizer | None = None,
    cache_dir=None,
    *,
    root=None,
    progress: bool = True,
) -> torch.Tensor:
    """All documents of ``split`` tokenized and concatenated, each followed by EOT: 1-D int64 tensor.

    The result is cached at ``<cache_dir>/stdlib-<split>-<corpus fingerprint>-<tokenizer>-<digest>.pt``
    (``cache_dir`` defaults to ``$EFFML_CACHE`` or ``~/.cache/effml``); the names change whenever the
    files or the merges change, so a stale cache is never read. On disk ids are int16 (vocab < 32768),
    in memory int64, the dtype ``nn.Embedding`` and ``cross_entropy`` targets expect.
    """
    _check_split(split)
    tok = load_tokenizer() if tokenizer is None else tokenizer
    if not isinstance(tok, Tokenizer):
        raise TypeError(f"tokenizer must be an effml_lib.tokenizer.Tokenizer, got {type(tok).__name__}")
    root = _root(root)
    fingerprint = corpus_fingerprint(split, root)
    path = _cache_dir(cache_dir) / f"stdlib-{split}-{fingerprint}-{tok.name}-{tok.digest}.pt"
    if path.is_file():
        return torch.load(path, weights_only=True)["tokens"].long()

    files = _split_files(split, root)
    ids: list[int] = []
    for f in tqdm(files, desc=f"tokenizing {split}", unit="file", disable=not progress):
        # allow_special=False: a file that happens to contain "<|endoftext|>" must not forge a
        # document boundary; the only EOTs are the ones we put between files.
        ids.extend(tok.encode((root / f).read_bytes().decode("utf-8"), allow_special=False))
        ids.append(tok.eot_id)
    dtype = torch.int16 if tok.vocab_size <= 2**15 else torch.int32
    tokens = torch.tensor(ids, dtype=dtype)  # (n_tokens,)

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    meta = {"split": split, "fingerprint": fingerprint, "tokenizer": tok.name, "files": len(files)}
    torch.save({"tokens": tokens, "meta": meta}, tmp)
    os.replace(tmp, path)  # atomic: a concurrent reader sees the whole file or none
    return tokens.long()


# --- batching ------------------------------------------------------------------------------------


def _check_tokens(tokens, seq_len: int, batch_size: int | None = None) -> None:
    if not isinstance(tokens, torch.Tensor):
        raise TypeError(f"tokens must be a torch.Tensor, got {type(tokens).__name__}")
    if tokens.dim() != 1:
        raise ValueError(f"tokens must be 1-D (n_tokens,), got shape {tuple(tokens.shape)}")
    if tokens.dtype.is_floating_point or tokens.dtype.is_complex or tokens.dtype == torch.bool:
        raise TypeError(f"tokens must hold integer ids, got dtype {tokens.dtype}")
    for name, v in (("seq_len", seq_len), ("batch_size", batch_size)):
        if v is None:
            continue
        if isinstance(v, bool) or not isinstance(v, int):
            raise TypeError(f"{name} must be an int, got {type(v).__name__}")
        if v < 1:
            raise ValueError(f"{name} must be >= 1, got {v}")
    # A window needs seq_len inputs plus one more token for the last target.
    if seq_len >= tokens.numel():
        raise ValueError(
            f"seq_len={seq_len} is too long for {tokens.numel()} tokens: "
            f"a window needs seq_len + 1 tokens, so seq_len must be <= {tokens.numel() - 1}"
        )


def random_batches(
    tokens: torch.Tensor,
    batch_size: int,
    seq_len: int,
    generator: torch.Generator,
    device=None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One training batch of random contiguous windows: ``x, y`` of shape (batch_size, seq_len), int64.

    ``y[b, t] == x[b, t + 1]``: the target at each position is the next token. Windows may cross
    document boundaries (marked by EOT), as in GPT-style pre-training. Call again for the next
    batch; the sequence of batches is fixed by the generator's seed.
    """
    _check_tokens(tokens, seq_len, batch_size)
    if not isinstance(generator, torch.Generator):
        raise TypeError(
            f"generator must be a torch.Generator (e.g. torch.Generator().manual_seed(0)), "
            f"got {type(generator).__name__}"
        )
    n_starts = tokens.numel() - seq_len  # start s is valid while s + seq_len <= n - 1
    starts = torch.randint(0, n_starts, (batch_size,), generator=generator, device=generator.device)
    offsets = torch.arange(seq_len + 1, device=starts.device)
    idx = starts.to(tokens.device)[:, None] + offsets.to(tokens.device)  # (B, T+1)
    window = tokens[idx].long()  # (B, T+1)
    x, y = window[:, :-1], window[:, 1:]  # (B, T) each
    if device is not None:
        x, y = x.to(device), y.to(device)
    return x, y


def sequential_batches(
    tokens: torch.Tensor, batch_size: int, seq_len: int
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Non-overlapping windows in order, for evaluation: every target ``tokens[1:]`` exactly once.

    Window ``i`` is ``x = tokens[i*T : (i+1)*T]``, ``y = tokens[i*T+1 : (i+1)*T+1]``. Yields
    ``(x, y)`` of shape (batch_size, T) (the last full batch may have fewer rows); if ``n - 1`` is
    not a multiple of T, the leftover targets come last as one shorter window of shape (1, r), so a
    perplexity computed from all batches covers the held-out tokens exactly once. (Each window
    starts with no context, so this slightly overestimates loss vs. a sliding window; it is cheap.)
    """
    _check_tokens(tokens, seq_len, batch_size)  # here, not in the generator: errors at call time
    return _sequential(tokens, batch_size, seq_len)


def _sequential(tokens, batch_size, seq_len):
    n_targets = tokens.numel() - 1
    n_windows = n_targets // seq_len
    full = tokens[: n_windows * seq_len + 1].long()
    x_all = full[:-1].view(n_windows, seq_len)  # (W, T)
    y_all = full[1:].view(n_windows, seq_len)  # (W, T)
    for i in range(0, n_windows, batch_size):
        yield x_all[i : i + batch_size], y_all[i : i + batch_size]
    rest = n_targets - n_windows * seq_len
    if rest:
        start = n_windows * seq_len
        yield (
            tokens[start : start + rest].long().view(1, rest),
            tokens[start + 1 : start + rest + 1].long().view(1, rest),
        )


# --- the course tokenizer, trained on the corpus --------------------------------------------------


def train_tokenizer(vocab_size: int = 4096, name: str | None = None, *, root=None, progress: bool = True) -> Tokenizer:
    """The course tokenizer's recipe: byte-level BPE (:func:`effml_lib.tokenizer.train_bpe`) on the
    train split, named ``effml-bpe-<vocab_size>`` by default, its metadata naming the corpus."""
    root = _root(root)
    metadata = {
        "trained_on": "python-stdlib/train",
        "python": sys.version.split()[0],
        "corpus_fingerprint": corpus_fingerprint("train", root),
    }
    texts = read_corpus("train", root)
    return train_bpe(texts, vocab_size, name=name or f"effml-bpe-{vocab_size}", metadata=metadata, progress=progress)


def tokenizer_cli(argv=None) -> int:
    """``python -m effml_lib.tokenizer train|info``: rebuild the shipped tokenizer, or measure one."""
    parser = argparse.ArgumentParser(
        prog="python -m effml_lib.tokenizer",
        description="Train the course tokenizer on the stdlib corpus (train split), or inspect one.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    p_train = sub.add_parser("train", help="learn merges from the corpus' train split and save them")
    p_train.add_argument("--vocab-size", type=int, default=4096)
    p_train.add_argument("--name", default=None, help="default: effml-bpe-<vocab size>")
    p_train.add_argument("--out", default=None, help="default: effml_lib/assets/tokenizer/<name>.json")
    p_info = sub.add_parser("info", help="print a tokenizer's size and its compression on the corpus")
    p_info.add_argument("--name", default=DEFAULT_TOKENIZER)
    args = parser.parse_args(argv)

    if args.command == "train":
        name = args.name or f"effml-bpe-{args.vocab_size}"
        out = Path(args.out) if args.out else ASSETS_DIR / f"{name}.json"
        root = stdlib_root()
        files = _split_files("train", root)
        print(f"corpus: {len(files)} train files, {sum((root / f).stat().st_size for f in files):,} bytes, "
              f"Python {sys.version.split()[0]}")
        t0 = time.perf_counter()
        tok = train_tokenizer(args.vocab_size, name)
        print(f"trained {tok} in {time.perf_counter() - t0:.1f} s")
        tok.save(out)
        print(f"saved {out} ({out.stat().st_size:,} bytes)")
    else:
        tok = load_tokenizer(args.name)
        print(tok, tok.metadata)
        for split in SPLITS:
            texts = read_corpus(split)
            n_bytes = sum(len(t.encode("utf-8")) for t in texts)
            t0 = time.perf_counter()
            n_tok = sum(len(tok.encode(t, allow_special=False)) for t in texts)
            dt = time.perf_counter() - t0
            print(f"{split:8s} {len(texts):4d} files {n_bytes:>11,} bytes {n_tok:>10,} tokens "
                  f"{n_bytes / n_tok:.2f} bytes/token  (encoded in {dt:.1f} s)")
    return 0


def _main() -> int:
    root = stdlib_root()
    print(f"Python {sys.version.split()[0]}, stdlib at {root}")
    tok = load_tokenizer()
    for split in SPLITS:
        files = _split_files(split, root)
        n_bytes = sum((root / f).stat().st_size for f in files)
        t0 = time.perf_counter()
        tokens = load_tokens(split, tok, progress=False)
        dt = time.perf_counter() - t0
        print(f"{split:8s} {len(files):4d} files {n_bytes:>11,} bytes {tokens.numel():>10,} tokens "
              f"(incl. {len(files)} EOT) {n_bytes / (tokens.numel() - len(files)):.2f} bytes/token "
              f"fingerprint {corpus_fingerprint(split, root)} (loaded in {dt:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(_main())
