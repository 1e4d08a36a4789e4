"""Tests for effml_lib.data: corpus selection, split, fingerprint, token cache, batch samplers."""

import random
import re
import sysconfig
from pathlib import Path

import pytest
import torch

from effml_lib import data
from effml_lib.tokenizer import Tokenizer, load_tokenizer, train_bpe

# --- a fake stdlib, so exclusions are checked file by file --------------------------------------

KEPT = {
    "os.py": "import sys\n",
    "json/__init__.py": '"""JSON."""\n',
    "json/decoder.py": "def decode(s):\n    return s\n",
    "encodings/utf_8.py": "import codecs\n",  # hand-written codec: kept
    "unicode.py": "# ünïcödé 🐍\nx = 'é'\r\n",
    "z/deep/er/mod.py": "pass\n",
    "test/test_os.py": "import unittest\n",  # test suites: kept, for training only
    "unittest/test/test_case.py": "pass\n",
    "distutils/tests/test_x.py": "pass\n",
    "lib2to3/tests/data/bom.py": "pass\n",
    "idlelib/idle_test/test_x.py": "pass\n",
}
DROPPED = {
    "site-packages/numpy/__init__.py": "pass\n",
    "dist-packages/foo.py": "pass\n",
    "__pycache__/os.py": "pass\n",
    "pydoc_data/topics.py": "topics = {}\n",
    "_sysconfigdata__linux_x86_64-linux-gnu.py": "build_time_vars = {}\n",
    "config-3.11-x86_64-linux-gnu/python-config.py": "#!/usr/bin/python\n",
    "encodings/cp1252.py": '""" Python Character Mapping Codec cp1252 generated from X with gencodec.py.\n',
    "README.txt": "not python\n",
    "os.pyc": "not source\n",
}


@pytest.fixture
def fake_root(tmp_path: Path) -> Path:
    root = tmp_path / "lib"
    for rel, text in {**KEPT, **DROPPED}.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(text.encode("utf-8"))
    (root / "latin1.py").write_bytes("# caf\xe9\n".encode("latin-1"))  # not UTF-8: dropped
    (root / "big.py").write_bytes(b"x = 1\n" * 200_000)  # 1.2 MB: dropped
    return root


def test_corpus_files_exclusions(fake_root):
    assert data.corpus_files(fake_root) == sorted(KEPT)


def test_corpus_files_bad_root(tmp_path):
    with pytest.raises(ValueError, match="root"):
        data.corpus_files(tmp_path / "nope")


def test_real_stdlib_corpus():
    root = data.stdlib_root()
    assert root == Path(sysconfig.get_paths()["stdlib"]) and (root / "os.py").is_file()
    files = data.corpus_files()
    assert files == sorted(files) and len(files) > 300
    assert {"os.py", "json/decoder.py", "asyncio/events.py"} <= set(files)
    for f in files:
        parts = f.split("/")
        assert f.endswith(".py") and "\\" not in f
        assert not {"site-packages", "dist-packages"} & set(parts[:-1]), f
        assert not f.startswith("_sysconfigdata") and f != "pydoc_data/topics.py"
    # Between 3.10 and 3.13 the library code is ~8-14 MB, plus up to ~20 MB of test suites.
    total = sum((root / f).stat().st_size for f in files)
    assert 5e6 < total < 4e7, total


def test_test_suites_are_never_held_out():
    for path in ["test/test_socket.py", "unittest/test/test_case.py", "idlelib/idle_test/test_x.py",
                 "lib2to3/tests/data/bom.py", "test/test_email/test_email.py"]:
        assert data.split_of(path) == "train", path
    # a library module whose name merely contains "test" is split by its hash like any other
    assert data.split_of("doctest.py") in ("train", "heldout")


# --- split ---------------------------------------------------------------------------------------


def test_split_is_stable():
    # Pinned values: if these change, every published number changes its meaning.
    assert data.split_of("os.py") == "train"
    assert data.split_of("json/decoder.py") == "train"
    for heldout in ["contextvars.py", "gettext.py", "optparse.py", "socket.py", "xml/dom/minidom.py"]:
        assert data.split_of(heldout) == "heldout", heldout


def test_split_fraction():
    rng = random.Random(0)
    paths = [f"pkg{rng.randrange(100)}/mod_{i}.py" for i in range(20_000)]
    frac = sum(data.split_of(p) == "heldout" for p in paths) / len(paths)
    assert 0.045 < frac < 0.055, frac


def test_real_splits_partition_the_corpus():
    files = data.corpus_files()
    train = [f for f in files if data.split_of(f) == "train"]
    heldout = [f for f in files if data.split_of(f) == "heldout"]
    assert not set(train) & set(heldout)
    assert sorted(train + heldout) == files
    library = [f for f in files if not data.TEST_DIRS & set(f.split("/")[:-1])]
    assert 0.02 < len(heldout) / len(library) < 0.09


def test_split_validation(fake_root):
    with pytest.raises(TypeError, match="relpath"):
        data.split_of(Path("os.py"))
    with pytest.raises(ValueError, match="split"):
        data.read_corpus("test", root=fake_root)
    with pytest.raises(ValueError, match="split"):
        data.load_tokens("validation", root=fake_root)


# --- reading and fingerprints --------------------------------------------------------------------


def test_read_corpus_exact_text_in_path_order(fake_root):
    both = {}
    for split in data.SPLITS:
        files = [f for f in sorted(KEPT) if data.split_of(f) == split]
        texts = data.read_corpus(split, root=fake_root)
        assert texts == [KEPT[f] for f in files]  # exact, "\r\n" kept
        both[split] = texts
    assert sum(len(t) for t in both.values()) == len(KEPT)


def test_fingerprint(fake_root):
    fp = data.corpus_fingerprint("train", fake_root)
    assert len(fp) == 16 and int(fp, 16) >= 0
    assert fp == data.corpus_fingerprint("train", fake_root)
    assert fp != data.corpus_fingerprint("heldout", fake_root)
    target = next(f for f in sorted(KEPT) if data.split_of(f) == "train")
    (fake_root / target).write_text(KEPT[target] + "# edited\n", encoding="utf-8")
    assert data.corpus_fingerprint("train", fake_root) != fp


# --- tokens --------------------------------------------------------------------------------------


def test_load_tokens_and_cache(fake_root, tmp_path, monkeypatch):
    tok = load_tokenizer()
    cache = tmp_path / "cache"
    monkeypatch.setenv("EFFML_CACHE", str(cache))
    tokens = data.load_tokens("train", tok, root=fake_root, progress=False)
    assert tokens.dtype == torch.int64 and tokens.dim() == 1
    texts = data.read_corpus("train", root=fake_root)
    assert int((tokens == tok.eot_id).sum()) == len(texts) and int(tokens[-1]) == tok.eot_id
    assert tok.decode(tokens) == "".join(t + "<|endoftext|>" for t in texts)

    files = list(cache.glob("*.pt"))
    fp = data.corpus_fingerprint("train", fake_root)
    assert len(files) == 1 and fp in files[0].name and tok.name in files[0].name
    # Second call reads the cache (same values); an explicit cache_dir wins over the env variable.
    assert torch.equal(data.load_tokens("train", tok, root=fake_root, progress=False), tokens)
    other = tmp_path / "other"
    data.load_tokens("train", tok, cache_dir=other, root=fake_root, progress=False)
    assert len(list(other.glob("*.pt"))) == 1

    # Editing a file changes the fingerprint, hence the cache file: no stale tokens.
    target = next(f for f in sorted(KEPT) if data.split_of(f) == "train")
    (fake_root / target).write_text("y = 2\n", encoding="utf-8")
    fresh = data.load_tokens("train", tok, root=fake_root, progress=False)
    assert len(list(cache.glob("*.pt"))) == 2 and not torch.equal(fresh, tokens)


def test_load_tokens_real_heldout(tmp_path):
    tok = load_tokenizer()
    tokens = data.load_tokens("heldout", tok, cache_dir=tmp_path, progress=False)
    n_files = len(data.read_corpus("heldout"))
    assert int((tokens == tok.eot_id).sum()) == n_files
    assert int(tokens.min()) >= 0 and int(tokens.max()) < tok.vocab_size
    assert tokens.numel() > 50_000


def test_load_tokens_rejects_bad_tokenizer(fake_root, tmp_path):
    with pytest.raises(TypeError, match="tokenizer"):
        data.load_tokens("train", tokenizer="effml-bpe-4096", cache_dir=tmp_path, root=fake_root)


# --- the course tokenizer ------------------------------------------------------------------------


def test_train_tokenizer_is_bpe_on_the_train_split(fake_root):
    tok = data.train_tokenizer(300, root=fake_root, progress=False)
    assert tok.merges == train_bpe(data.read_corpus("train", fake_root), 300, progress=False).merges
    assert tok.name == "effml-bpe-300"
    assert tok.metadata["corpus_fingerprint"] == data.corpus_fingerprint("train", fake_root)


def test_tokenizer_cli_train_and_info(fake_root, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(data, "stdlib_root", lambda: fake_root)  # the commands read this "stdlib"
    out = tmp_path / "bpe.json"
    assert data.tokenizer_cli(["train", "--vocab-size", "300", "--out", str(out)]) == 0
    assert Tokenizer.load(out).merges == data.train_tokenizer(300, root=fake_root, progress=False).merges
    assert data.tokenizer_cli(["info"]) == 0
    printed = capsys.readouterr().out
    assert f"saved {out}" in printed
    assert re.search(r"^train .* bytes/token", printed, re.M) and re.search(r"^heldout .* bytes/token", printed, re.M)


# --- batches -------------------------------------------------------------------------------------


def test_random_batches_shapes_and_shift():
    tokens = torch.arange(1000, dtype=torch.int16) * 3  # distinct values, so positions are known
    g = torch.Generator().manual_seed(0)
    x, y = data.random_batches(tokens, 8, 32, g)
    assert x.shape == y.shape == (8, 32) and x.dtype == y.dtype == torch.int64
    assert torch.equal(x[:, 1:], y[:, :-1])
    starts = x[:, 0] // 3
    expected = (starts[:, None] + torch.arange(33)) * 3  # each row is a contiguous window
    assert torch.equal(x, expected[:, :-1]) and torch.equal(y, expected[:, 1:])


def test_random_batches_seeded_and_cover_the_end():
    tokens = torch.arange(50)
    a = data.random_batches(tokens, 4, 8, torch.Generator().manual_seed(1))
    b = data.random_batches(tokens, 4, 8, torch.Generator().manual_seed(1))
    c = data.random_batches(tokens, 4, 8, torch.Generator().manual_seed(2))
    assert torch.equal(a[0], b[0]) and not torch.equal(a[0], c[0])
    # seq_len = n - 1 leaves exactly one window: all tokens are reachable, none out of bounds.
    x, y = data.random_batches(tokens, 3, 49, torch.Generator().manual_seed(0))
    assert torch.equal(x[0], tokens[:-1]) and torch.equal(y[0], tokens[1:])
    g = torch.Generator().manual_seed(0)
    seen = torch.cat([data.random_batches(tokens, 64, 8, g)[1].flatten() for _ in range(20)])
    assert int(seen.max()) == 49 and int(seen.min()) == 1


def test_random_batches_validation():
    tokens = torch.arange(100)
    g = torch.Generator().manual_seed(0)
    with pytest.raises(ValueError, match="seq_len=100"):
        data.random_batches(tokens, 2, 100, g)
    with pytest.raises(ValueError, match="batch_size"):
        data.random_batches(tokens, 0, 10, g)
    with pytest.raises(TypeError, match="seq_len"):
        data.random_batches(tokens, 2, 10.0, g)
    with pytest.raises(TypeError, match="generator"):
        data.random_batches(tokens, 2, 10, 0)
    with pytest.raises(ValueError, match="1-D"):
        data.random_batches(tokens.view(10, 10), 2, 5, g)
    with pytest.raises(TypeError, match="integer"):
        data.random_batches(tokens.float(), 2, 5, g)
    with pytest.raises(TypeError, match="torch.Tensor"):
        data.random_batches(list(range(100)), 2, 5, g)


@pytest.mark.parametrize("n,batch_size,seq_len", [(103, 3, 10), (101, 4, 10), (11, 5, 10), (50, 1, 7)])
def test_sequential_batches_cover_each_token_once(n, batch_size, seq_len):
    tokens = torch.arange(n, dtype=torch.int32)
    batches = list(data.sequential_batches(tokens, batch_size, seq_len))
    xs = torch.cat([x.flatten() for x, _ in batches])
    ys = torch.cat([y.flatten() for _, y in batches])
    assert torch.equal(xs, tokens[:-1].long()) and torch.equal(ys, tokens[1:].long())
    for x, y in batches:
        assert x.shape == y.shape and x.dtype == torch.int64
        assert x.shape[0] <= batch_size and x.shape[1] <= seq_len
        assert torch.equal(x + 1, y)  # within a row, y is x shifted by one


def test_sequential_batches_validation():
    with pytest.raises(ValueError, match="seq_len"):
        data.sequential_batches(torch.arange(10), 2, 10)  # raises at call time, not on iteration
    with pytest.raises(ValueError, match="batch_size"):
        data.sequential_batches(torch.arange(10), -1, 3)
