"""grading/parts.py, the one table of lab parts, agrees with the labs, the library and the hidden suites;
and no notebook answers a lab part (DESIGN.md, "Labs and grading"): none prints the source of a part's
answer key, none defines a name a lab asks for."""

import ast
import importlib
import re
import sys

import pytest

from conftest import ROOT, lab_solution

sys.path.insert(0, str(ROOT / "grading"))
from parts import PARTS  # noqa: E402

nbformat = pytest.importorskip("nbformat", reason="the lab tooling is in the dev extra")

PART_ROWS = [(lab, part) for lab, spec in PARTS.items() for part in spec["parts"]]
IDS = [f"{lab}-{part['part']}" for lab, part in PART_ROWS]
NOTEBOOK_SOURCES = sorted((ROOT / "notebooks" / "src").glob("*.py"))


def library_object(name: str):
    """"attention.attention_reference" -> that object of effml_lib (dotted attributes after the module)."""
    module, *attributes = name.split(".")
    obj = importlib.import_module(f"effml_lib.{module}")
    for attribute in attributes:
        obj = getattr(obj, attribute)
    return obj


@pytest.fixture(scope="module")
def solutions():
    return {spec["notebook"]: lab_solution(spec["notebook"]) for spec in PARTS.values()}


@pytest.mark.parametrize("lab,part", PART_ROWS, ids=IDS)
def test_each_part_has_its_suite_its_cell_and_its_names(lab, part, solutions):
    notebook = PARTS[lab]["notebook"]
    assert (ROOT / "grading" / "hidden" / lab / f"test_{part['part']}.py").is_file(), f"{lab}: no suite for {part['part']}"
    cells = nbformat.read(ROOT / "solutions" / notebook / f"{notebook}.ipynb", as_version=4).cells
    graded = {c.metadata.get("nbgrader", {}).get("grade_id"): c.metadata["nbgrader"] for c in cells
              if c.metadata.get("nbgrader", {}).get("grade")}
    assert part["grade_id"] in graded, f"{notebook} has no graded cell {part['grade_id']}"
    assert graded[part["grade_id"]]["points"] == part["points"], f"{part['grade_id']}: points differ from the table"
    for name in part["asks"]:
        assert name in solutions[notebook], f"{notebook}'s solution defines no {name}, which {part['part']} asks for"
    for name in part["hides"] + part["library"]:
        if name.startswith("kernels."):
            continue  # Triton modules: importable only where Triton is
        library_object(name)  # raises if the table names something the library does not have


# Parts whose answer key is a library function that the lab asks for in another form, and why.
# (Where the key is a class, e.g. model.RMSNorm, the lab asks for a function of raw weights instead.)
OTHER_FORM = {
    ("lab03", "generate"): "greedy only, the new tokens as lists, built on the lab's own cache and forward: "
                           "not decoding.generate's sampling, options and tensors",
}


@pytest.mark.parametrize("lab,part", [(lab, p) for lab, p in PART_ROWS if p["library"]],
                         ids=[i for i, (_, p) in zip(IDS, PART_ROWS) if p["library"]])
def test_a_part_uses_the_library_name_of_its_answer_key(lab, part):
    """Where a lab asks for the same function as the library, it asks under the library's name."""
    functions = {name.split(".")[-1] for name in part["library"] if callable(library_object(name))
                 and not isinstance(library_object(name), type) and name.count(".") == 1}
    if not functions or (lab, part["part"]) in OTHER_FORM:
        return
    assert functions & set(part["asks"]), (
        f"{lab} {part['part']} asks for {part['asks']}, but its library version is {sorted(functions)}")


def listed_sources(path) -> list[str]:
    """The dotted names a notebook source prints with show_source(...)."""
    return re.findall(r"show_source\(\s*([\w.]+)\s*\)", path.read_text())


def defined_names(path) -> set[str]:
    """The functions and classes a notebook source defines (its cells are one Python file)."""
    return {node.name for node in ast.walk(ast.parse(path.read_text()))
            if isinstance(node, (ast.FunctionDef, ast.ClassDef))}


def answers(listed: str, key: str) -> bool:
    """Does printing ``listed`` (e.g. "StaticKVCache.write", "RMSNorm") show answer key ``key`` (e.g.
    "kvcache.StaticKVCache.write", "model.RMSNorm")? A class's listing shows its methods."""
    key = key.split(".", 1)[1]  # drop the module
    return listed == key or key.startswith(listed + ".") or listed.startswith(key + ".")


@pytest.mark.parametrize("source", NOTEBOOK_SOURCES, ids=[p.stem for p in NOTEBOOK_SOURCES])
def test_no_notebook_prints_the_answer_to_a_lab_part(source):
    shown = []
    for listed in listed_sources(source):
        for lab, part in PART_ROWS:
            shown += [f"show_source({listed}) answers {lab} {part['part']} ({key})"
                      for key in part["library"] if answers(listed, key)]
    assert not shown, "; ".join(shown)


@pytest.mark.parametrize("source", NOTEBOOK_SOURCES, ids=[p.stem for p in NOTEBOOK_SOURCES])
def test_no_notebook_defines_what_a_lab_asks_for(source):
    asked = {name: f"{lab} {part['part']}" for lab, part in PART_ROWS for name in part["asks"]}
    clash = sorted(defined_names(source) & set(asked))
    assert not clash, f"{source.name} defines {clash}, which {[asked[n] for n in clash]} ask for"


def test_the_checks_see_a_listing_and_a_definition(tmp_path):
    """The two notebook checks above catch what they look for."""
    fake = tmp_path / "99_fake.py"
    fake.write_text("# %%\nshow_source(StaticKVCache.write)\nshow_source(RMSNorm)\n\n# %%\ndef rms_norm(x, w):\n    return x\n")
    assert listed_sources(fake) == ["StaticKVCache.write", "RMSNorm"]
    assert answers("StaticKVCache.write", "kvcache.StaticKVCache.write")
    assert answers("RMSNorm", "model.RMSNorm") and answers("RMSNorm.forward", "model.RMSNorm")
    assert answers("StaticKVCache", "kvcache.StaticKVCache.update")  # the class shows its methods
    assert not answers("Attention.forward", "attention.attention")
    assert not answers("repeat_kv", "attention.attention_reference")
    assert "rms_norm" in defined_names(fake)
