"""The grading chain end to end, offline: a class's LMS zip -> autograde -> feedback -> grades CSV.

Each lab's class (grading/demo_submissions.py) holds what depends on the lab: the solution, the blank
release, a wrong answer and a call to the library's own implementation. Lab 01's class also holds the
grader's own cases, graded once because the grader handles them alike whatever the lab: an infinite
loop, a kernel crash, edited and deleted test cells, stray files, noisy warnings and two ungradable
submissions. Each student must get its exact score.
"""

import csv
import importlib.util
import os
import re
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
    if str(ROOT / "grading") not in sys.path:
        sys.path.insert(0, str(ROOT / "grading"))  # autograde imports parts, sandbox and trusted from there
    spec.loader.exec_module(module)
    return module


demo = load("demo_submissions")
autograde = load("autograde")
hostile = load("hostile_submissions")
CANARY = "canary-4c1d8e2b"  # planted in the grader's environment and home for lab 01's class


LABS = list(demo.CLASSES)
CASES = [(lab, student) for lab in LABS for student in demo.CLASSES[lab]["expected"]]
GRADER_LAB = demo.GRADER_LAB
# What the wrong answer's feedback must say: the hidden test's message about that mistake.
WRONG_ANSWER_MESSAGE = {"lab01_transformer_basics": "LayerNorm", "lab02_rope": "interleaved=True",
                        "lab03_kv_cache": "must go to its own positions", "lab04_gqa": "uses KV head i // 4",
                        "lab05_quantization": "not pack_int4's neighbours"}


@pytest.fixture(scope="module")
def graded(tmp_path_factory, bubblewrap_available):
    """``graded(lab)``: grade that lab's demo class once (on first use); every test reads the results."""
    results = {}

    def grade(lab):
        if lab not in results:
            tmp = tmp_path_factory.mktemp(lab)
            archive = demo.write_zip(tmp / "submissions.zip", lab)
            home = tmp / "instructor-home"  # the grader's HOME, with a secret in it (lab 01's class looks)
            home.mkdir()
            (home / hostile.CANARY_FILE).write_text(CANARY)
            env = {**os.environ, "HOME": str(home), hostile.CANARY_ENV: CANARY}
            # 60 s per cell: lab 03's visible timing cell took over 30 s on a loaded 2-core machine, and
            # the solution must run clean; only lab 01's class has a never-ending cell that waits it out.
            run = subprocess.run(
                [sys.executable, str(ROOT / "grading" / "autograde.py"), lab, str(archive), "--out", str(tmp / "graded"),
                 "--jobs", "2", "--cell-timeout", "60"],
                capture_output=True, text=True, timeout=2400, env=env,
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
    explanations = {demo.wrong_case(lab): WRONG_ANSWER_MESSAGE[lab], "library_call": "a library function this lab hides while your code is graded"}
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
        "kernel_crash": "crashed its process",
        "damaged_member": "damaged in the archive",
        "tampered_flags": "restored",
        "edited_tests": "restored",
        "stray_files": "file(s) other than notebooks were ignored",
        "not_a_notebook": "not a readable notebook",
        "only_a_pdf": "no notebook",
    }
    for student, phrase in explanations.items():
        page = (out / "feedback" / sid(student, GRADER_LAB) / f"{GRADER_LAB}.html").read_text()
        assert phrase in page, f"{GRADER_LAB} {student}: the feedback should say {phrase!r}"
    assert "timed out" in rows[sid("infinite_loop", GRADER_LAB)]["notes"]
    assert "crashed its process" in rows[sid("kernel_crash", GRADER_LAB)]["notes"]
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
    assert sorted(found) == ["ann", "bob", "cy_42"], "a Canvas file's student is its name and user id"
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


def test_two_canvas_students_of_one_name_stay_two_and_a_damaged_member_costs_only_its_own(tmp_path):
    nb = (ROOT / "labs" / LAB / f"{LAB}.ipynb").read_bytes()
    archive = tmp_path / "canvas.zip"
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr(f"lee_101_9001_{LAB}.ipynb", nb)
        z.writestr(f"lee_202_9002_{LAB}.ipynb", nb)
        z.writestr(f"kim_303_9003_{LAB}.ipynb", nb)
    with zipfile.ZipFile(archive) as z:
        info = z.getinfo(f"kim_303_9003_{LAB}.ipynb")
    raw = bytearray(archive.read_bytes())
    start = info.header_offset + 30 + len(info.filename.encode()) + len(info.extra)
    for i in range(start + 20, start + 60):  # spoil kim's compressed bytes
        raw[i] ^= 0x5A
    archive.write_bytes(bytes(raw))
    found = {s.student: s for s in autograde.collect(archive, LAB)}
    assert sorted(found) == ["kim_303", "lee_101", "lee_202"]
    assert found["lee_101"].notebook == nb and found["lee_202"].notebook == nb
    assert found["kim_303"].notebook is None and "damaged in the archive" in " ".join(found["kim_303"].notes)


def test_tampered_flags_are_put_back_from_the_release():
    release = nbformat.read(ROOT / "labs" / LAB / f"{LAB}.ipynb", as_version=4)
    student = nbformat.from_dict(release)
    cell = {c.metadata.nbgrader.grade_id: c for c in student.cells}
    cell["p2_tests"].metadata.nbgrader.update(grade=False, points=100)
    cell["p2_tests"].source = "passed = 2"
    cell["p1_solution"].metadata.nbgrader["locked"] = True
    cell["p1_solution"].source = "def attention(q, k, v, causal=True, mask=None):\n    return q"
    assert sorted(autograde.restore_cells(student, release)) == ["p1_solution", "p2_tests"]
    ours = {c.metadata.nbgrader.grade_id: c for c in release.cells}
    for gid in ("p1_solution", "p2_tests"):
        assert cell[gid].metadata.nbgrader == ours[gid].metadata.nbgrader, gid
    assert cell["p2_tests"].source == ours["p2_tests"].source, "a graded cell's text comes back too"
    assert "return q" in cell["p1_solution"].source, "a solution cell keeps the student's answer"


def test_a_byte_order_mark_does_not_make_a_notebook_unreadable():
    data = (ROOT / "labs" / LAB / f"{LAB}.ipynb").read_bytes()
    assert autograde.read_notebook(b"\xef\xbb\xbf" + data) == autograde.read_notebook(data)
    with pytest.raises(Exception):
        autograde.read_notebook(b"{ this is not json")


# --- the hostile class (grading/hostile_submissions.py): what no case may do --------------------------

def test_no_case_reads_what_it_must_not(graded):
    """The environment, the home folder, the hidden tests, the gradebook, other students' files: none
    of it reaches any feedback page or graded notebook (the looking-around case prints all it finds)."""
    out, rows, _ = graded(GRADER_LAB)
    hidden_lines = [line.strip() for p in (ROOT / "grading" / "hidden" / "lab01").glob("test_*.py")
                    for line in p.read_text().splitlines() if line.strip().startswith("def test_")]
    for student_id in rows:
        for page in (out / "feedback" / student_id).glob("*.html"):
            text = page.read_text()
            assert CANARY not in text, f"{student_id}: the grader's secret is in the feedback"
            assert not [line for line in hidden_lines if line in text], f"{student_id}: hidden test code in the feedback"
    looked = nbformat.read(out / "autograded" / sid("attacks_others", GRADER_LAB) / f"{GRADER_LAB}.ipynb", as_version=4)
    printed = "".join(o.get("text", "") for c in looked.cells if c.cell_type == "code" for o in c.outputs
                      if o.output_type == "stream")
    assert "FOUND: []" in printed, f"the sandbox showed the grader's files: {printed[:2000]}"
    assert "NETWORK: " in printed and "NETWORK: reached" not in printed
    wrote = re.search(r"WROTE IN: \[(.*)\]", printed)[1]
    assert all(folder.strip("' ").startswith("/tmp") for folder in wrote.split(",")), f"it wrote outside /tmp: {wrote}"
    assert CANARY not in printed and hostile.CANARY_FILE not in printed.split("HOME:", 1)[1].split("\n", 1)[0]


def test_no_case_outlives_its_grading_or_writes_outside_its_sandbox(graded, tmp_path_factory):
    out, _, _ = graded(GRADER_LAB)
    running = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout
    assert hostile.DAEMON not in running, "a process a submission started is still running"
    # where the attacks write, seen from outside: the top of every folder they try, and all of this run's
    marked = [p for folder in (Path("/"), Path("/tmp"), Path("/work"), Path("/root"), ROOT, Path.home())
              for p in folder.glob(f"{hostile.MARKER}*")]
    marked += list(tmp_path_factory.getbasetemp().rglob(f"{hostile.MARKER}*"))
    assert not marked, f"files written outside a sandbox: {marked[:5]}"


def test_a_timed_part_shows_its_plot(graded):
    out, _, _ = graded(GRADER_LAB)
    nb = nbformat.read(out / "autograded" / sid("solution", GRADER_LAB) / f"{GRADER_LAB}.ipynb", as_version=4)
    timed = next(c for c in nb.cells if c.metadata.get("nbgrader", {}).get("grade_id") == "p5_tests")
    assert any("image/png" in o.get("data", {}) for o in timed.outputs), "the performance part's plot is missing"


def test_output_is_capped_and_the_flood_costs_nothing(graded):
    out, rows, _ = graded(GRADER_LAB)
    page = out / "feedback" / sid("floods_output", GRADER_LAB) / f"{GRADER_LAB}.html"
    assert page.stat().st_size < 3 * 2**20, f"a 20 MB output line made a {page.stat().st_size / 2**20:.0f} MiB page"
    assert "more characters cut by the grader" in page.read_text()
