"""The grading chain end to end, offline: a class's LMS zip -> autograde -> feedback -> grades CSV.

Each lab's class (grading/demo_submissions.py) holds what depends on the lab: the solution, the blank
release, a wrong answer and a call to the library's own implementation. Lab 01's class also holds the
grader's own cases, graded once because the grader handles them alike whatever the lab: an infinite
loop, a kernel crash, edited and deleted test cells, stray files, noisy warnings and two ungradable
submissions. Each student must get its exact score.
"""

import csv
import importlib.util
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

pytest.importorskip("nbgrader", reason="the lab tooling is in the dev extra")
nbformat = pytest.importorskip("nbformat")

ROOT = Path(__file__).resolve().parents[1]
LAB = "lab01_transformer_basics"


def load(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / "grading" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up here while the class is built
    sys.path.insert(0, str(ROOT / "grading"))  # autograde imports resilient_execute from there
    try:
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(ROOT / "grading"))
    return module


demo = load("demo_submissions")
autograde = load("autograde")


LABS = list(demo.CLASSES)
CASES = [(lab, student) for lab in LABS for student in demo.CLASSES[lab]["expected"]]
GRADER_LAB = demo.GRADER_LAB
# What the wrong answer's feedback must say: the hidden test's message about that mistake.
WRONG_ANSWER_MESSAGE = {"lab01_transformer_basics": "LayerNorm", "lab02_rope": "interleaved=True",
                        "lab03_kv_cache": "must go to its own positions", "lab04_gqa": "uses KV head i // 4"}


@pytest.fixture(scope="module")
def graded(tmp_path_factory):
    """``graded(lab)``: grade that lab's demo class once (on first use); every test reads the results."""
    results = {}

    def grade(lab):
        if lab not in results:
            tmp = tmp_path_factory.mktemp(lab)
            archive = demo.write_zip(tmp / "submissions.zip", lab)
            # 60 s per cell: lab 03's visible timing cell took over 30 s on a loaded 2-core machine, and
            # the solution must run clean; only lab 01's class has a never-ending cell that waits it out.
            run = subprocess.run(
                [sys.executable, str(ROOT / "grading" / "autograde.py"), lab, str(archive), "--out", str(tmp / "graded"),
                 "--jobs", "2", "--cell-timeout", "60"],
                capture_output=True, text=True, timeout=1500,
            )
            assert run.returncode == 0, f"the driver failed:\n{run.stdout[-3000:]}\n{run.stderr[-3000:]}"
            with open(tmp / "graded" / "grades.csv", newline="") as f:
                rows = {row["student"]: row for row in csv.DictReader(f)}
            results[lab] = (tmp / "graded", rows, run.stdout)
        return results[lab]

    return grade


def sid(student, lab):
    return demo.expected_student_id(student, lab)


@pytest.mark.parametrize("lab,student", CASES)
def test_each_submission_gets_its_exact_score(graded, lab, student):
    _, rows, _ = graded(lab)
    assert sid(student, lab) in rows, f"{student} ({sid(student, lab)}) has no row in grades.csv; rows: {sorted(rows)}"
    row, expected = rows[sid(student, lab)], demo.CLASSES[lab]["expected"][student]
    scores = {col.split(" ")[0]: float(value) for col, value in row.items() if col.startswith("p") and "_tests" in col}
    assert scores == {gid: float(points) for gid, points in expected.items()}, (
        f"{lab} {student}: got {scores}, expected {expected}; notes: {row['notes']}")
    assert float(row["score"]) == sum(expected.values())
    assert float(row["max_score"]) == sum(demo.CLASSES[lab]["expected"]["solution"].values())


@pytest.mark.parametrize("lab", LABS)
def test_every_student_is_recorded_once_with_feedback(graded, lab):
    out, rows, _ = graded(lab)
    assert sorted(rows) == sorted(sid(s, lab) for s in demo.CLASSES[lab]["expected"])
    full = sum(demo.CLASSES[lab]["expected"]["solution"].values())
    for student_id in rows:
        page = (out / "feedback" / student_id / f"{lab}.html").read_text()
        assert f"{float(rows[student_id]['score']):g} / {full} points" in page, f"{student_id}: the feedback does not state the score"


@pytest.mark.parametrize("lab", LABS)
def test_feedback_does_not_reveal_hidden_tests(graded, lab):
    out, rows, _ = graded(lab)
    short = lab.split("_")[0]  # "lab01"
    hidden_texts = [p.read_text() for p in (ROOT / "grading" / "hidden" / short).glob("test_*.py")]
    distinctive = [line.strip() for text in hidden_texts for line in text.splitlines()
                   if line.strip().startswith(("def test_", "expected = ", "reference(", "def reference("))]
    assert distinctive, "found nothing to look for in the hidden tests"
    for student_id in rows:
        page = (out / "feedback" / student_id / f"{lab}.html").read_text()
        assert "BEGIN HIDDEN TESTS" not in page and "run_hidden_tests" not in page, f"{student_id}: hidden region shown"
        leaked = [line for line in distinctive if line in page]
        assert not leaked, f"{student_id}: feedback quotes hidden test code: {leaked[:3]}"


@pytest.mark.parametrize("lab", LABS)
def test_feedback_explains_the_lab_s_mistakes(graded, lab):
    out, _, _ = graded(lab)
    explanations = {demo.wrong_case(lab): WRONG_ANSWER_MESSAGE[lab], "library_call": "unavailable while this part is graded"}
    for student, phrase in explanations.items():
        page = (out / "feedback" / sid(student, lab) / f"{lab}.html").read_text()
        assert phrase in page, f"{lab} {student}: the feedback should say {phrase!r}"


@pytest.mark.parametrize("lab", LABS)
def test_the_solution_runs_clean_and_every_graded_cell_reports(graded, lab):
    """Not only full marks: the visible tests pass too (an error there costs no points, so the score
    alone would not show it), and each graded cell printed that all its hidden tests passed."""
    out, _, _ = graded(lab)
    nb = nbformat.read(out / "autograded" / sid("solution", lab) / f"{lab}.ipynb", as_version=4)
    errors = [(c.metadata.get("nbgrader", {}).get("grade_id") or f"cell {i + 1}", o.get("ename"), o.get("evalue"))
              for i, c in enumerate(nb.cells) if c.cell_type == "code" for o in c.outputs if o.output_type == "error"]
    assert not errors, f"{lab}: the solution's notebook has errors: {errors}"
    for cell in nb.cells:
        if cell.metadata.get("nbgrader", {}).get("grade"):
            text = "".join(o.get("text", "") for o in cell.outputs if o.output_type == "stream")
            reported = autograde.PASSED_LINE.search(text)
            assert reported and reported[1] == reported[2], f"{lab} {cell.metadata.nbgrader.grade_id}: {text!r}"


def test_every_lab_s_class_holds_the_lab_cases_and_one_the_grader_s():
    for lab in LABS:
        students = list(demo.CLASSES[lab]["expected"])
        assert students[:4] == ["solution", "blank", demo.wrong_case(lab), "library_call"], f"{lab}: {students}"
        assert students[4:] == (list(demo.GRADER_CASES) if lab == GRADER_LAB else []), f"{lab}: {students}"
        assert lab in WRONG_ANSWER_MESSAGE, f"{lab}: say what its wrong answer's feedback must say"
        parts = demo.CLASSES[lab]["expected"]["solution"]
        assert all(set(points) == set(parts) for points in demo.CLASSES[lab]["expected"].values()), (
            f"{lab}: every student's expected scores must name every graded cell")


def test_feedback_explains_what_the_grader_did(graded):
    out, rows, _ = graded(GRADER_LAB)
    explanations = {
        "infinite_loop": "timed out",
        "kernel_crash": "crashed the kernel",
        "edited_tests": "restored",
        "stray_files": "file(s) other than notebooks were ignored",
        "not_a_notebook": "not a readable notebook",
        "only_a_pdf": "no notebook",
    }
    for student, phrase in explanations.items():
        page = (out / "feedback" / sid(student, GRADER_LAB) / f"{GRADER_LAB}.html").read_text()
        assert phrase in page, f"{GRADER_LAB} {student}: the feedback should say {phrase!r}"
    assert "timed out" in rows[sid("infinite_loop", GRADER_LAB)]["notes"]
    assert "crashed the kernel" in rows[sid("kernel_crash", GRADER_LAB)]["notes"]
    assert rows[sid("infinite_loop", GRADER_LAB)]["status"] == "graded, some cells failed"
    assert rows[sid("noisy_warnings", GRADER_LAB)]["status"] == "graded"
    assert rows[sid("not_a_notebook", GRADER_LAB)]["status"] == "not graded"
    assert rows[sid("only_a_pdf", GRADER_LAB)]["status"] == "not graded"


@pytest.mark.parametrize("lab", LABS)
def test_the_graded_notebook_is_kept_for_the_instructor(graded, lab):
    out, _, _ = graded(lab)
    students = ("solution", "kernel_crash", "edited_tests") if lab == GRADER_LAB else ("solution",)
    for student in students:
        nb = nbformat.read(out / "autograded" / sid(student, lab) / f"{lab}.ipynb", as_version=4)
        ids = [c.metadata.get("nbgrader", {}).get("grade_id") for c in nb.cells]
        assert all(gid in ids for gid in demo.CLASSES[lab]["expected"]["solution"]), (
            f"{lab} {student}: graded cells missing: {ids}")


# --- collecting and restoring, without running anything ----------------------------------------

def test_collect_reads_folders_zips_and_refuses_paths_outside(tmp_path):
    nb = b'{"cells": [], "metadata": {}, "nbformat": 4, "nbformat_minor": 5}'
    layout = {  # nbgrader collect's layout, a student folder, a flat Canvas file, a checkpoint to skip
        f"ann/{LAB}/{LAB}.ipynb": nb, f"ann/{LAB}/timestamp.txt": b"2026-11-23", "bob/anything.ipynb": nb,
        "bob/notes.txt": b"x",
        f"cy_42_7_{LAB}.ipynb": nb, f"ann/{LAB}/.ipynb_checkpoints/{LAB}-checkpoint.ipynb": nb,
    }
    folder = tmp_path / "folder"
    for rel, data in layout.items():
        (folder / rel).parent.mkdir(parents=True, exist_ok=True)
        (folder / rel).write_bytes(data)
    found = {s.student: s for s in autograde.collect(folder, LAB)}
    assert sorted(found) == ["ann", "bob", "cy"]
    assert all(s.notebook == nb for s in found.values())
    assert "ignored" in " ".join(found["bob"].notes)
    assert not found["ann"].notes, "the exchange's own timestamp.txt is not the student's stray file"

    archive = tmp_path / "hostile.zip"
    with zipfile.ZipFile(archive, "w") as z:
        z.writestr("../../escape/evil.ipynb", nb)
        z.writestr("/abs/dan/x.ipynb", nb)
        z.writestr("Eve Smith_77_assignsubmission_file_/lab.ipynb", nb)
    found = {s.student: s for s in autograde.collect(archive, LAB)}
    assert "Eve_Smith_77" in found and all(".." not in s and "/" not in s for s in found)
    assert not (tmp_path.parent / "escape").exists(), "collect must not write the zip's paths to disk"


def test_restore_cells_puts_back_deleted_cells_in_place():
    release = nbformat.read(ROOT / "labs" / LAB / f"{LAB}.ipynb", as_version=4)
    ids = [c.metadata.nbgrader.grade_id for c in release.cells]
    student = nbformat.from_dict(release)
    student.cells = [c for c in student.cells if c.metadata.nbgrader.grade_id not in ("p1_visible", "p3_tests")]
    forged = nbformat.v4.new_code_cell("pass", metadata={"nbgrader": {"grade": True, "grade_id": "bonus", "points": 99}})
    student.cells.append(forged)
    restored = autograde.restore_cells(student, release)
    assert restored == ["p1_visible", "p3_tests"]
    assert [c.metadata.get("nbgrader", {}).get("grade_id") for c in student.cells] == [*ids, None], (
        "restored cells must return to their place, and a forged graded cell must lose its nbgrader metadata")


def test_a_byte_order_mark_does_not_make_a_notebook_unreadable():
    data = (ROOT / "labs" / LAB / f"{LAB}.ipynb").read_bytes()
    assert autograde.read_notebook(b"\xef\xbb\xbf" + data) == autograde.read_notebook(data)
    with pytest.raises(Exception):
        autograde.read_notebook(b"{ this is not json")
