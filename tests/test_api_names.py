"""Every public effml_lib name that a notebook, a lab or a hidden test uses is in docs/API.md.

The collector reads the code cells of notebooks/*.ipynb, solutions/*/*.ipynb and labs/*/*.ipynb, and
the hidden test suites grading/hidden/**/*.py (they are part of the labs: API.md is the contract they
are written against too). With ``ast``, in source order, it follows

- ``from effml_lib.x import a, b as c`` and ``from effml_lib import x``,
- ``import effml_lib.x as m`` then ``m.attr``, ``import effml_lib`` then ``effml_lib.x.attr``,
- ``Class.attr`` for a class of effml_lib, and ``obj.attr`` where ``obj`` holds what a call of an
  effml_lib class, classmethod or function annotated to return one gave (``model = pretrained()``,
  ``cache = StaticKVCache.for_model(...)``, ``benchmark(...).median_ms``); a later assignment of
  anything else to the name forgets it.

Class attributes count when they are defined in the body of an effml_lib class (methods, properties,
fields), not when inherited from torch (``model.eval()``) or set in ``__init__`` (``model.layers``).
Names starting with ``_`` are private. The rule for "documented" is :func:`documented`.
"""

from __future__ import annotations

import ast
import importlib
import inspect
import json
import re
import typing
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
API = ROOT / "docs" / "API.md"
NOTEBOOK_GLOBS = ("notebooks/*.ipynb", "solutions/*/*.ipynb", "labs/*/*.ipynb")
HIDDEN_GLOB = "grading/hidden/**/*.py"
PACKAGE = "effml_lib"


# --- reading sources -----------------------------------------------------------------------------


def without_magics(source: str) -> str:
    """IPython magics and shell lines (``%pip``, ``!git``, ``%%time``) become ``pass``, same indent."""
    lines = source.splitlines()
    for i, line in enumerate(lines):
        if line.lstrip().startswith(("%", "!")):
            lines[i] = line[: len(line) - len(line.lstrip())] + "pass"
    return "\n".join(lines)


def notebook_cells(path: Path) -> list[tuple[str, str]]:
    """``(where, source)`` of each code cell, ``where`` like ``notebooks/03_kv_cache.ipynb cell 7``."""
    cells = json.loads(path.read_text(encoding="utf-8"))["cells"]
    rel = path.relative_to(ROOT).as_posix()
    return [(f"{rel} cell {i}", "".join(c["source"])) for i, c in enumerate(cells) if c["cell_type"] == "code"]


def sources() -> list[list[tuple[str, str]]]:
    """One list of ``(where, source)`` per namespace: a notebook's cells share one, a .py file has its own."""
    found = [notebook_cells(p) for g in NOTEBOOK_GLOBS for p in sorted(ROOT.glob(g))]
    found += [[(p.relative_to(ROOT).as_posix(), p.read_text(encoding="utf-8"))] for p in sorted(ROOT.glob(HIDDEN_GLOB))]
    return found


# --- what a name refers to -------------------------------------------------------------------------


@dataclass(frozen=True)
class Ref:
    """An effml_lib object reached by name: a module (``name`` empty), a module's ``name``, or
    ``Class.attr``. ``obj`` is the live object (None where the import would fail)."""

    module: str  # "" for the package itself, else e.g. "kvcache"
    name: str
    obj: object


@dataclass(frozen=True)
class Instance:
    """A value known to be an instance of an effml_lib class."""

    cls: type


def _module_name(cls_or_fn) -> str | None:
    mod = getattr(cls_or_fn, "__module__", "") or ""
    return mod[len(PACKAGE) + 1 :] if mod.startswith(PACKAGE + ".") else None


def _import(module: str):
    try:
        return importlib.import_module(f"{PACKAGE}.{module}" if module else PACKAGE)
    except ImportError:
        return None


def _is_submodule(module: str) -> bool:
    try:
        return importlib.util.find_spec(f"{PACKAGE}.{module}") is not None
    except ImportError:
        return False


def _own_attr(cls: type, attr: str):
    """The object ``attr`` names in the body of ``cls`` or an effml_lib base, else None."""
    for k in cls.__mro__:
        if _module_name(k) is None:
            continue
        if attr in vars(k):
            return vars(k)[attr]
        if attr in vars(k).get("__annotations__", {}):
            return attr  # a field without a default
    return None


def _returned_class(fn) -> type | None:
    try:
        ret = typing.get_type_hints(fn).get("return")
    except Exception:  # an annotation that does not evaluate here: no inference
        return None
    return ret if inspect.isclass(ret) and _module_name(ret) is not None else None


class Collector(ast.NodeVisitor):
    """Walks the statements of one namespace in source order; ``uses[(module, name)]`` is where each is used."""

    def __init__(self):
        self.env: dict[str, Ref | Instance] = {}
        self.uses: dict[tuple[str, str], set[str]] = defaultdict(set)
        self.where = ""

    def feed(self, where: str, source: str) -> None:
        self.where = where
        try:
            tree = ast.parse(without_magics(source))
        except SyntaxError as e:
            raise AssertionError(f"{where}: cannot parse line {e.lineno}: {e.msg}") from None
        self.visit(tree)

    def _use(self, module: str, name: str, node: ast.AST) -> None:
        if module and not any(part.startswith("_") for part in name.split(".")):
            self.uses[(module, name)].add(f"{self.where} line {node.lineno}")

    def _bind(self, name: str, value) -> None:
        if value is None:
            self.env.pop(name, None)
        else:
            self.env[name] = value

    def _member(self, module: str, name: str, node) -> Ref:
        """``module.name``, recorded as a use (a submodule of the package is a module, not a use)."""
        if module == "" and _is_submodule(name):
            return Ref(name, "", _import(name))
        obj = getattr(_import(module), name, None)
        home = _module_name(obj) if (inspect.isclass(obj) or inspect.isfunction(obj)) else None
        ref = Ref(home or module, name, obj)
        self._use(ref.module, name, node)
        return ref

    def _class_attr(self, cls: type, attr: str, node) -> Ref | None:
        obj = _own_attr(cls, attr)
        if obj is None:
            return None
        ref = Ref(_module_name(cls), f"{cls.__name__}.{attr}", obj)
        self._use(ref.module, ref.name, node)
        return ref

    def value_of(self, node) -> Ref | Instance | None:
        """What ``node`` evaluates to, as far as effml_lib is concerned (None: nothing known)."""
        if isinstance(node, ast.Name):
            return self.env.get(node.id)
        if isinstance(node, ast.Attribute):
            base = self.value_of(node.value)
            if base is None or node.attr.startswith("_"):
                return None
            if isinstance(base, Instance):
                return self._class_attr(base.cls, node.attr, node)
            if base.name == "":  # a module
                return self._member(base.module, node.attr, node)
            if inspect.isclass(base.obj):
                return self._class_attr(base.obj, node.attr, node)
            return None
        if isinstance(node, ast.Call):
            f = self.value_of(node.func)
            if not isinstance(f, Ref):
                return None
            if inspect.isclass(f.obj) and _module_name(f.obj):
                return Instance(f.obj)
            if isinstance(f.obj, classmethod):  # Class.make(...) -> that class, unless annotated
                cls = getattr(_import(f.module), f.name.split(".")[0])
                return Instance(_returned_class(f.obj.__func__) or cls)
            fn = f.obj.__func__ if isinstance(f.obj, staticmethod) else f.obj
            cls = _returned_class(fn) if callable(fn) else None
            return Instance(cls) if cls else None
        return None

    # -- statements that bind names

    def visit_Import(self, node):
        for alias in node.names:
            if alias.name == PACKAGE or alias.name.startswith(PACKAGE + "."):
                if alias.asname:
                    module = alias.name[len(PACKAGE) + 1 :]
                    self._bind(alias.asname, Ref(module, "", _import(module)))
                else:  # ``import effml_lib.x`` binds ``effml_lib``
                    self._bind(PACKAGE, Ref("", "", _import("")))
            else:
                self._bind((alias.asname or alias.name).split(".")[0], None)

    def visit_ImportFrom(self, node):
        mod = node.module or ""
        ours = node.level == 0 and (mod == PACKAGE or mod.startswith(PACKAGE + "."))
        for alias in node.names:
            if alias.name == "*":
                continue
            value = self._member(mod[len(PACKAGE) + 1 :], alias.name, node) if ours else None
            self._bind(alias.asname or alias.name, value)

    def visit_Assign(self, node):
        self.visit(node.value)
        value = self.value_of(node.value)
        for target in node.targets:
            self._assign(target, value)

    def visit_AnnAssign(self, node):
        if node.value is not None:
            self.visit(node.value)
        self._assign(node.target, self.value_of(node.value) if node.value is not None else None)

    def _assign(self, target, value):
        if isinstance(target, ast.Name):
            self._bind(target.id, value)
        else:
            self.visit(target)  # x.attr = ..., x[i] = ...: reads x
            for n in ast.walk(target):
                if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Store):
                    self._bind(n.id, None)

    def visit_Name(self, node):
        if isinstance(node.ctx, ast.Store):  # for-loop targets, with ... as x, x += ...
            self._bind(node.id, None)

    def visit_FunctionDef(self, node):
        self._bind(node.name, None)
        self.generic_visit(node)

    visit_AsyncFunctionDef = visit_ClassDef = visit_FunctionDef

    def visit_Attribute(self, node):
        self.value_of(node)  # records the uses along the chain
        self.generic_visit(node)


def collect(namespaces) -> dict[tuple[str, str], set[str]]:
    """``{(module, name): {where, ...}}`` over namespaces of ``(where, source)`` pairs (see :func:`sources`)."""
    uses: dict[tuple[str, str], set[str]] = defaultdict(set)
    for cells in namespaces:
        collector = Collector()
        for where, source in cells:
            collector.feed(where, source)
        for key, wheres in collector.uses.items():
            uses[key] |= wheres
    return uses


# --- what docs/API.md documents --------------------------------------------------------------------


def module_sections(text: str) -> dict[str, list[list[str]]]:
    """For each module named in backticks in a ``## `` heading: its sections' blocks (a bullet with its
    continuation lines, or a paragraph), each block as the list of its inline code spans."""
    sections: dict[str, list[list[str]]] = defaultdict(list)
    for part in re.split(r"^## ", text, flags=re.M)[1:]:
        heading, _, body = part.partition("\n")
        blocks = re.split(r"\n(?=- )|\n\s*\n", body)
        spans = [re.findall(r"`([^`]+)`", block) for block in blocks]
        for module in re.findall(r"`(\w+)`", heading):
            sections[module] += spans
    return sections


def _starts(span: str, name: str) -> bool:
    return re.match(rf"{re.escape(name)}(?!\w)", span.strip()) is not None


def documented(sections: dict[str, list[list[str]]], module: str, name: str) -> bool:
    """Whether ``name`` (``"f"`` or ``"Class.attr"``) of ``module`` is documented in its section.

    ``f`` is when a code span there starts with ``f`` or ``module.f`` (``f(x, y)``, ``f -> int``).
    ``Class.attr`` is when a span starts with ``Class.attr``, or when a block (bullet) that documents
    ``Class`` also has a span starting with ``attr`` or ``.attr``, or names ``attr`` as a parameter of
    ``Class(...)`` (a field of a dataclass or named tuple).
    """
    blocks = sections.get(module, [])
    prefixes = (name, f"{module}.{name}")
    if any(_starts(s, p) for block in blocks for s in block for p in prefixes):
        return True
    if "." not in name:
        return False
    cls, attr = name.split(".", 1)
    for block in blocks:
        heads = [s for s in block if _starts(s, cls) or _starts(s, f"{module}.{cls}")]
        if not heads:
            continue
        if any(_starts(s, attr) or _starts(s, "." + attr) for s in block):
            return True
        if any(re.search(rf"[(,]\s*{re.escape(attr)}\s*[=,):]", s) for s in heads):
            return True
    return False


# --- tests -------------------------------------------------------------------------------------------

MADE_UP_CELL = """\
%matplotlib inline
if False:
    !pip install something
import effml_lib
import effml_lib.kvcache as kvc
from effml_lib.model import Transformer, ModelConfig as MC
from effml_lib.checkpoints import pretrained
from effml_lib import measure
import torch

kvc.kv_cache_bytes(1, 2, 3, 4, 5)
effml_lib.rope.apply_rope
effml_lib.__file__
model = pretrained("effml-tiny")
cos, sin = model.rope_tables("cpu")
model._rope, model.eval(), model.layers
cache = kvc.StaticKVCache.for_model(model, batch_size=1)
cache.layer(0)
Transformer.set_rope
cfg = MC(vocab_size=8, dim=8, n_layers=1, n_heads=1)
cfg.dim
t = measure.benchmark(torch.zeros, 1).median_ms
cache = torch.zeros(1)
cache.nbytes
"""


def test_collector_on_a_made_up_cell():
    uses = collect([[("made-up", MADE_UP_CELL)]])
    assert set(uses) == {
        ("kvcache", "kv_cache_bytes"),
        ("kvcache", "StaticKVCache"),
        ("kvcache", "StaticKVCache.for_model"),
        ("kvcache", "StaticKVCache.layer"),
        ("rope", "apply_rope"),
        ("model", "Transformer"),
        ("model", "ModelConfig"),
        ("model", "ModelConfig.dim"),
        ("model", "Transformer.rope_tables"),  # model = pretrained(...) -> Transformer
        ("model", "Transformer.set_rope"),
        ("checkpoints", "pretrained"),
        ("measure", "benchmark"),
        ("measure", "Timing.median_ms"),  # benchmark(...) -> Timing
    }  # not: effml_lib.__file__, model._rope, model.eval (torch's), model.layers (set in __init__), cache.nbytes (rebound)
    assert uses[("model", "Transformer.rope_tables")] == {"made-up line 15"}


def test_collector_reports_cells_it_cannot_parse():
    with pytest.raises(AssertionError, match=r"nb cell 3: cannot parse line 1"):
        collect([[("nb cell 3", "def f(:\n")]])


def test_documented_rule():
    sections = module_sections(
        "# title\n\n## `kvcache`\n- `kv_cache_bytes(a, b) -> int`.\n"
        "- `StaticKVCache(n_layers, dtype)`, `StaticKVCache.for_model(model)`; `.layer(i)`,\n"
        "  `update(layer, k)`.\n- `MODEL_SHAPES_EXTRA` and `shape`.\n\n"
        "## `tokenizer`, `data`\n- `data.read_corpus(split)`, `load_tokenizer()`.\n"
    )
    yes = ["kv_cache_bytes", "StaticKVCache", "StaticKVCache.for_model", "StaticKVCache.layer",
           "StaticKVCache.update", "StaticKVCache.n_layers", "StaticKVCache.dtype"]
    no = ["MODEL_SHAPES", "kv_cache", "StaticKVCache.write", "StaticKVCache.shape", "StaticKVCache.k"]
    assert [n for n in yes if not documented(sections, "kvcache", n)] == []
    assert [n for n in no if documented(sections, "kvcache", n)] == []
    assert documented(sections, "data", "read_corpus") and documented(sections, "tokenizer", "load_tokenizer")
    assert not documented(sections, "data", "load_tokens") and not documented(sections, "rope", "read_corpus")


def test_every_source_kind_is_read():
    namespaces = sources()
    for pattern in (*NOTEBOOK_GLOBS, HIDDEN_GLOB):
        prefix = pattern.split("*")[0]
        found = collect(ns for ns in namespaces if ns[0][0].startswith(prefix))
        assert found, f"no effml_lib name found in {pattern}: the collector or the globs are broken"


def test_every_used_name_is_in_api_md():
    uses = collect(sources())
    sections = module_sections(API.read_text(encoding="utf-8"))
    missing = {key: wheres for key, wheres in uses.items() if not documented(sections, *key)}
    lines = []
    for (module, name), wheres in sorted(missing.items()):
        shown = sorted(wheres, key=lambda w: [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", w)])
        more = f" (+{len(shown) - 3} more)" if len(shown) > 3 else ""
        lines.append(f"  {module}.{name}: used in {'; '.join(shown[:3])}{more}")
    assert not missing, (
        f"{len(missing)} effml_lib names used by notebooks, labs or hidden tests are not in docs/API.md "
        "(each needs a code span starting with its name in its module's section, see documented()):\n"
        + "\n".join(lines)
    )
