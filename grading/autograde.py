"""Autograde a lab for a whole class: submissions in, grades CSV and feedback HTML out.

    python grading/autograde.py LAB SUBMISSIONS [--out DIR] [--jobs N] [--cell-timeout S]

LAB is a folder name under solutions/ (e.g. lab01_transformer_basics). SUBMISSIONS is one of
  - a folder with one subfolder per student (anything .ipynb inside, at any depth; this includes what
    `nbgrader collect` writes, submitted/<student>/<lab>/<lab>.ipynb), or a flat folder of notebooks;
  - an LMS zip: Moodle (<Full Name>_<id>_assignsubmission_file_/<file>.ipynb), Canvas
    (<name>_<userid>_<subid>_<file>.ipynb), or any zip laid out like the folders above.

Each student is graded by nbgrader in a course directory of their own, with only their notebook
copied in (stray files such as a torch.py beside it never reach the kernel), deleted or edited
test cells restored from the source, a timeout per cell and per student, and cells that hang or
kill the kernel skipped (grading/resilient_execute.py). Students are graded in parallel. Whatever
happens, every student gets a row in grades.csv and a feedback page saying what happened.

Writes into --out: grades.csv, feedback/<student>/<lab>.html, autograded/<student>/<lab>.ipynb,
logs/<student>.log.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import csv
import html
import json
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
import zipfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import nbformat

ROOT = Path(__file__).resolve().parents[1]
MAX_NOTEBOOK_BYTES = 64 * 2**20  # a bigger "notebook" in a submission is not read
PASSED_LINE = re.compile(r"(\d+) of (\d+) hidden tests passed")
FEEDBACK_STYLE = ("font-family: sans-serif; border: 2px solid #888; border-radius: 6px; padding: 1em; "
                  "margin: 1em auto; max-width: 60em; background: #f7f7f7")


# --- collecting submissions -------------------------------------------------------------------

@dataclass
class Submission:
    student: str
    notebook: bytes | None  # None: nothing usable was submitted
    origin: str  # where it came from, for the instructor
    notes: list[str] = field(default_factory=list)


def student_id(name: str) -> str:
    """A safe nbgrader student id from a folder or file name (LMS names carry spaces and ids)."""
    name = name.replace("_assignsubmission_file_", "").replace("_assignsubmission_onlinetext_", "")
    safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("._-")
    return safe[:100] or "unnamed"


CANVAS_NAME = re.compile(r"^(?P<student>[^_]+)(?:_LATE)?_(?P<user>\d+)_\d+_.+\.ipynb$", re.IGNORECASE)


def _owner(parts: tuple[str, ...]) -> str:
    """The student a file belongs to: its top folder, or for a flat file its Canvas name and user id
    (two students of one name stay two), or its stem."""
    if len(parts) > 1:
        return student_id(parts[0])
    match = CANVAS_NAME.match(parts[0])
    return student_id(f"{match['student']}_{match['user']}" if match else Path(parts[0]).stem)


def _entries_from_folder(folder: Path):
    for path in sorted(folder.rglob("*")):
        rel = path.relative_to(folder).parts
        if any(p.startswith(".") for p in rel) or path.is_symlink():
            continue  # .ipynb_checkpoints and friends; links could point anywhere
        if path.is_file():
            yield rel, path.stat().st_size, path.read_bytes


def _entries_from_zip(archive: zipfile.ZipFile):
    for info in sorted(archive.infolist(), key=lambda i: i.filename):
        rel = tuple(p for p in info.filename.replace("\\", "/").split("/") if p not in ("", ".", ".."))
        if info.is_dir() or not rel or any(p.startswith((".", "__MACOSX")) for p in rel):
            continue
        yield rel, info.file_size, (lambda info=info: archive.read(info))


# What nbgrader's exchange writes beside each submission: not the student's, not worth a note.
EXCHANGE_FILES = {"timestamp.txt", "submission_secret.txt"}


def collect(submissions: Path, lab: str) -> list[Submission]:
    """Find each student's notebook. Nothing is extracted to disk by the names in the input."""
    found: dict[str, list[tuple[tuple[str, ...], int, object]]] = {}
    if submissions.is_dir():
        entries = list(_entries_from_folder(submissions))
        archive = None
    elif zipfile.is_zipfile(submissions):
        archive = zipfile.ZipFile(submissions)
        entries = list(_entries_from_zip(archive))
    else:
        raise SystemExit(f"submissions: expected a folder or a .zip file, got {submissions}")
    for rel, size, read in entries:
        found.setdefault(_owner(rel), []).append((rel, size, read))

    result = []
    for student, files in sorted(found.items()):
        notebooks = [f for f in files if f[0][-1].lower().endswith(".ipynb")]
        sub = Submission(student, None, "/".join(files[0][0]))
        others = [f for f in files if f not in notebooks and f[0][-1] not in EXCHANGE_FILES]
        if others:
            sub.notes.append(f"{len(others)} file(s) other than notebooks were ignored")
        if not notebooks:
            sub.notes.append("no notebook (.ipynb) was submitted")
            result.append(sub)
            continue
        # Several notebooks: prefer the one named after the lab, then the last in name order.
        notebooks.sort(key=lambda f: (lab in f[0][-1], f[0]))
        rel, size, read = notebooks[-1]
        sub.origin = "/".join(rel)
        if len(notebooks) > 1:
            sub.notes.append(f"{len(notebooks)} notebooks were submitted; graded {rel[-1]}")
        if size > MAX_NOTEBOOK_BYTES:
            sub.notes.append(f"{rel[-1]} is {size / 2**20:.0f} MiB, over the {MAX_NOTEBOOK_BYTES // 2**20} MiB limit")
        else:
            try:
                sub.notebook = read()
            except (zipfile.BadZipFile, zlib.error, EOFError, OSError) as err:  # one damaged member: this student only
                sub.notes.append(f"{rel[-1]} is damaged in the archive ({type(err).__module__}.{type(err).__name__}) and could not be read; "
                                 f"ask for it again")
        result.append(sub)
    if archive is not None:
        archive.close()
    return result


def read_notebook(data: bytes):
    """A submitted notebook from its bytes. A byte-order mark (which some Windows editors write) is
    dropped: the notebook is no less the student's for it."""
    return nbformat.reads(data.decode("utf-8-sig"), as_version=4)


# --- restoring cells --------------------------------------------------------------------------

def _grade_id(cell) -> str | None:
    meta = cell.get("metadata")
    meta = meta.get("nbgrader") if isinstance(meta, dict) else None
    gid = meta.get("grade_id") if isinstance(meta, dict) else None
    return gid if isinstance(gid, str) else None


def restore_cells(submitted, release) -> list[str]:
    """Put back every cell of the release that the student deleted (or whose nbgrader id they
    changed), after the nearest cell that precedes it in the release, and the release's nbgrader
    metadata on every cell whose flags were changed (grade, locked, solution, points). nbgrader then
    overwrites the locked ones with the source's text. Cells whose nbgrader id the release does not
    have (renamed or forged ones, or a second copy of one) become plain cells, worth nothing.
    Returns the ids restored."""
    restored_flags: list[str] = []
    by_id = {_grade_id(c): c for c in release.cells if _grade_id(c)}
    seen = set()
    for cell in submitted.cells:
        gid = _grade_id(cell)
        if not isinstance(cell.get("metadata"), dict):
            cell["metadata"] = {}
        if gid not in by_id or gid in seen:  # renamed, forged or a copy: a plain cell, worth nothing
            cell["metadata"].pop("nbgrader", None)
            continue
        seen.add(gid)
        ours = by_id[gid]
        if cell.get("metadata", {}).get("nbgrader") != ours.metadata.nbgrader or cell.get("cell_type") != ours.cell_type:
            # a flag flipped (grade, locked, solution, points) or the cell's type changed: the release's
            # metadata back, and for a cell the student does not write, its text too
            cell["metadata"]["nbgrader"] = dict(ours.metadata.nbgrader)
            if cell.get("cell_type") != ours.cell_type or not ours.metadata.nbgrader.get("solution"):
                for key in ("cell_type", "source"):
                    cell[key] = ours[key]
                if cell["cell_type"] == "code":
                    cell.setdefault("outputs", [])
                    cell.setdefault("execution_count", None)
                else:
                    cell.pop("outputs", None)
                    cell.pop("execution_count", None)
            restored_flags.append(gid)
    present = {_grade_id(c): i for i, c in enumerate(submitted.cells) if _grade_id(c)}
    restored, anchor = [], -1  # the index after which the next missing cell goes
    for cell in release.cells:
        gid = _grade_id(cell)
        if gid is None:
            continue
        if gid in present:
            anchor = present[gid]
            continue
        anchor += 1
        restored_cell = nbformat.from_dict(cell)
        restored_cell["id"] = uuid.uuid4().hex[:8]  # the student's notebook may still use the release's id
        submitted.cells.insert(anchor, restored_cell)
        present = {_grade_id(c): i for i, c in enumerate(submitted.cells) if _grade_id(c)}
        restored.append(gid)
    return restored_flags + [g for g in restored if g not in restored_flags]


# --- one course directory per student ---------------------------------------------------------

NBGRADER_CONFIG = """\
import sys
sys.path.insert(0, {grading!r})
from hide_test_code import ShortenTestTracebacks
from nbgrader.preprocessors import (LimitOutput, SaveAutoGrades, AssignLatePenalties, CheckCellMetadata, GetGrades,
                                    ClearHiddenTests, DeduplicateIds, OverwriteKernelspec, OverwriteCells)
from nbconvert.preprocessors import CSSHTMLHeaderPreprocessor, ClearMetadataPreprocessor

c = get_config()
c.CourseDirectory.root = {root!r}
c.CourseDirectory.course_id = "effml"
c.CourseDirectory.db_url = "sqlite:///" + {root!r} + "/gradebook.db"
# nbgrader runs nothing here: the notebook was run in the sandbox and the hidden tests outside it
# (grading/trusted.py); the outputs it reads, graded cells' included, are the ones this driver wrote.
c.Autograde.sanitize_preprocessors = [DeduplicateIds, OverwriteKernelspec, OverwriteCells, CheckCellMetadata]
c.Autograde.autograde_preprocessors = [ClearMetadataPreprocessor, LimitOutput, SaveAutoGrades, AssignLatePenalties,
                                       CheckCellMetadata]
c.Autograde.create_student = True
c.GenerateFeedback.preprocessors = [GetGrades, CSSHTMLHeaderPreprocessor, ClearHiddenTests, ShortenTestTracebacks]
# A student's markdown and raw cells are the student's HTML: sanitised, so the page runs no script and
# cannot restyle or cover the grader's summary.
c.HTMLExporter.sanitize_html = True
c.OverwriteKernelspec.enabled = True
c.OverwriteCells.add_missing_cells = True
c.ClearSolutions.code_stub = {{"python": "# YOUR CODE HERE\\nraise NotImplementedError()"}}
"""


def write_course(root: Path, lab: str, cell_timeout: int) -> None:
    (root / "source").mkdir(parents=True, exist_ok=True)
    shutil.copytree(ROOT / "solutions" / lab, root / "source" / lab, dirs_exist_ok=True)
    (root / "nbgrader_config.py").write_text(NBGRADER_CONFIG.format(grading=str(ROOT / "grading"), root=str(root)))


# nbgrader's command line, run as `nbgrader ARGS` runs it, less a needless cost. nbgrader imports
# nbformat, whose jsonschema imports rfc3987_syntax, which builds some thirty Earley parsers at import
# time (about 5 s of a 2-core CI machine, in every nbgrader process: two per student) for the "iri"
# formats, which no notebook schema uses (https://github.com/python-jsonschema/jsonschema/issues/1428).
# Marked absent, the module is skipped as jsonschema skips any missing optional checker; notebooks
# are validated exactly as before.
NBGRADER = [sys.executable, "-c", "import sys; sys.modules['rfc3987_syntax'] = None; sys.argv[0] = 'nbgrader'; "
            "from nbgrader.apps.nbgraderapp import main; sys.exit(main())"]


def nbgrader(args: list[str], cwd: Path, env: dict, timeout: float, log, memory_gb: float | None = None) -> str:
    """Run one nbgrader command in its own process group; returns "" or what went wrong."""

    def limits():
        os.setsid()
        if memory_gb:  # inherited by the kernel nbgrader starts
            cap = int(memory_gb * 2**30)
            resource.setrlimit(resource.RLIMIT_AS, (cap, cap))

    log.write(f"$ nbgrader {' '.join(args)}\n")
    log.flush()
    proc = subprocess.Popen([*NBGRADER, *args], cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT,
                            preexec_fn=limits)
    try:
        code = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        code = None
    finally:  # whatever the student's code left running in the group goes too
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()
    if code is None:
        return f"nbgrader {args[0]} took longer than {timeout:.0f} s and was stopped"
    return "" if code == 0 else f"nbgrader {args[0]} failed (exit code {code}); see the log"


# nbgrader's autograde (which here only reads the outputs and saves the scores) and its feedback, in one
# process: nbgrader's start-up is most of what either costs.
NBGRADER_BOTH = [sys.executable, "-c", """
import sys
sys.modules['rfc3987_syntax'] = None
from traitlets.config.loader import PyFileConfigLoader
from nbgrader.apps import NbGraderAPI
course, lab, student = sys.argv[1:4]
api = NbGraderAPI(config=PyFileConfigLoader('nbgrader_config.py', path=course).load_config())
for step in (api.autograde, api.generate_feedback):
    result = step(lab, student)
    print(result.get('log', ''))
    if not result['success']:
        print(result.get('error', ''))
        sys.exit(1)
"""]


def nbgrader_autograde_and_feedback(course: Path, lab: str, student: str, env: dict, log) -> str:
    """Run nbgrader's autograde and generate_feedback for one student; "" or what went wrong."""
    log.write(f"$ nbgrader autograde + generate_feedback {lab} --student {student} at {time.strftime('%H:%M:%S')}\n")
    log.flush()
    try:
        run = subprocess.run([*NBGRADER_BOTH, str(course), lab, student], cwd=course, env=env, stdout=log,
                             stderr=subprocess.STDOUT, timeout=600)
    except subprocess.TimeoutExpired:
        return "nbgrader took longer than 600 s and was stopped"
    return "" if run.returncode == 0 else f"nbgrader failed (exit code {run.returncode}); see the log"


@dataclass
class Result:
    student: str
    status: str  # "graded" | "graded, some cells failed" | "not graded"
    scores: dict[str, float]  # grade_id -> points
    notes: list[str]
    seconds: float


def grade_one(sub: Submission, lab: str, template: Path, work: Path, out: Path, release, parts, opts) -> Result:
    start = time.perf_counter()
    course = work / "students" / sub.student
    shutil.copytree(template, course)
    (course / "nbgrader_config.py").write_text(
        (template / "nbgrader_config.py").read_text().replace(str(template), str(course)))
    scores = {gid: 0.0 for gid, _, _ in parts}
    notes = list(sub.notes)
    log_path = out / "logs" / f"{sub.student}.log"

    def finish(status):
        write_feedback(out / "feedback" / sub.student / f"{lab}.html", course / "feedback" / sub.student / lab,
                       lab, sub.student, status, scores, parts, notes)
        return Result(sub.student, status, scores, notes, time.perf_counter() - start)

    if sub.notebook is None:
        return finish("not graded")
    try:
        nb = read_notebook(sub.notebook)
    except Exception as err:  # not JSON, not a notebook, not UTF-8: say so, grade zero
        notes.append(f"the submitted file is not a readable notebook ({type(err).__name__}: {str(err)[:200]})")
        return finish("not graded")
    restored = restore_cells(nb, release)
    if restored:
        notes.append(f"deleted or altered cells were restored from the lab: {', '.join(restored)}")

    with open(log_path, "w") as log:
        result = run_trusted(nb, lab, course, opts, log)
        if result is None:
            notes.append("the grader could not finish this notebook in time (see the log); nothing was scored")
            return finish("not graded")
        compose(nb, result, lab)
        if result.get("isolated") is False:
            notes.append("graded WITHOUT a sandbox (no working bubblewrap on the grading machine)")
        notes.extend(result.get("notes", []))
        submitted = course / "submitted" / sub.student / lab
        submitted.mkdir(parents=True)
        nbformat.write(nb, submitted / f"{lab}.ipynb")
        env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
        problem = nbgrader_autograde_and_feedback(course, lab, sub.student, env, log)
        autograded = course / "autograded" / sub.student / lab / f"{lab}.ipynb"
        if problem or not autograded.is_file():
            notes.append(problem or "nbgrader wrote no graded notebook")
            return finish("not graded")
        graded_nb = nbformat.read(autograded, as_version=4)
        scores.update(read_scores(course, lab, sub.student, graded_nb, parts, notes))
        if not (course / "feedback" / sub.student / lab / f"{lab}.html").is_file():
            notes.append("nbgrader wrote no feedback page")
    (out / "autograded" / sub.student).mkdir(parents=True, exist_ok=True)
    shutil.copy(autograded, out / "autograded" / sub.student / f"{lab}.ipynb")
    broken = describe_broken_cells(graded_nb)
    notes.extend(broken)
    return finish("graded, some cells failed" if broken else "graded")


# --- the sandboxed run and what it left --------------------------------------------------------

def sandbox_cells(nb, lab_id: str) -> list[dict]:
    """The code cells to run, in order; a graded cell becomes a marker where its part's names are kept."""
    from parts import PARTS

    part_of_cell = {p["grade_id"]: p["part"] for p in PARTS[lab_id]["parts"]}
    cells = []
    for index, cell in enumerate(nb.cells):
        if cell.get("cell_type") != "code":
            continue
        gid = _grade_id(cell)
        if gid in part_of_cell and cell.metadata.get("nbgrader", {}).get("grade"):
            cells.append({"index": index, "part": part_of_cell[gid]})
        else:
            source = cell.get("source", "")
            cells.append({"index": index, "source": source if isinstance(source, str) else "".join(source)})
    return cells


def run_trusted(nb, lab: str, course: Path, opts, log) -> dict | None:
    """grading/trusted.py for one student, in a process of its own (pytest's state is per process);
    the sandbox it starts dies with it. None if it did not finish."""
    from parts import PARTS, lab_of

    lab_id = lab_of(lab)
    job_path, result_path = course / "job.json", course / "result.json"
    job = {"lab": lab_id, "cells": sandbox_cells(nb, lab_id), "work": str(opts.sandbox_work), "cell_timeout": opts.cell_timeout,
           "threads": opts.threads, "limits": {"cpu_seconds": opts.student_timeout,
                                               "memory_bytes": int(opts.memory_gb * 2**30) if opts.memory_gb else 0},
           "hide": [str(p) for p in opts.secrets]}
    job_path.write_text(json.dumps(job))
    log.write(f"$ trusted.py (lab {lab_id}, {len(job['cells'])} code cells) at {time.strftime('%H:%M:%S')}\n")
    log.flush()
    env = {**os.environ, "OMP_NUM_THREADS": str(opts.threads)}
    proc = subprocess.Popen([sys.executable, str(ROOT / "grading" / "trusted.py"), str(job_path), str(result_path)],
                            cwd=course, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        proc.wait(timeout=opts.student_timeout)
    except subprocess.TimeoutExpired:
        log.write(f"trusted.py ran past --student-timeout ({opts.student_timeout} s) and was stopped\n")
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()
    if proc.returncode != 0 or not result_path.is_file():
        return None
    result = json.loads(result_path.read_text())
    log.write(f"sandboxed: {result.get('isolated')}; {json.dumps(result.get('stages', {}))}\n")
    return result


# Error names written into cells that hung or crashed; describe_broken_cells looks for them.
TIMEOUT_ENAME, CRASH_ENAME = "CellTimeoutError", "KernelDied"
MAX_TEXT = 20_000  # characters of one stream or plain-text output kept in the graded notebook
MAX_IMAGE = 2 * 2**20  # bytes of one base64 PNG
MAX_OUTPUTS = 30  # outputs of one cell
MAX_NOTEBOOK_OUTPUT = 8 * 2**20  # characters of all outputs together


def _cut(text, limit: int) -> str:
    text = text if isinstance(text, str) else ""
    return text if len(text) <= limit else text[:limit] + f"\n[… {len(text) - limit:,} more characters cut by the grader]"


def clean_output(output: dict) -> dict | None:
    """One output of the student's cell, as the feedback may show it: text cut to size, images
    checked to be PNGs, and nothing that a browser would run (HTML, JavaScript) kept."""
    kind = output.get("output_type") if isinstance(output, dict) else None
    if kind == "stream":
        return nbformat.v4.new_output("stream", name="stderr" if output.get("name") == "stderr" else "stdout",
                                      text=_cut(output.get("text"), MAX_TEXT))
    if kind == "display_data":
        data, kept = output.get("data") if isinstance(output.get("data"), dict) else {}, {}
        png = data.get("image/png")
        if isinstance(png, str) and len(png) <= MAX_IMAGE and re.fullmatch(r"[A-Za-z0-9+/=\s]+", png) and png.lstrip().startswith("iVBOR"):
            kept["image/png"] = png
        if isinstance(data.get("text/plain"), str):
            kept["text/plain"] = _cut(data["text/plain"], MAX_TEXT)
        return nbformat.v4.new_output("display_data", data=kept) if kept else None
    if kind == "error":
        trace = output.get("traceback") if isinstance(output.get("traceback"), list) else []
        return nbformat.v4.new_output("error", ename=_cut(output.get("ename"), 100), evalue=_cut(output.get("evalue"), 2000),
                                      traceback=[_cut(line, 1000) for line in trace[-20:] if isinstance(line, str)])
    return None


def compose(nb, result: dict, lab: str) -> None:
    """Put the sandbox's outputs into the student's cells and the hidden tests' results into the
    graded cells, which nbgrader then scores (an error output there: zero)."""
    from parts import PARTS, lab_of

    lab_id = lab_of(lab)
    part_of_cell = {p["grade_id"]: p["part"] for p in PARTS[lab_id]["parts"]}
    cell_outputs, broken, parts = result.get("cells", {}), result.get("broken", {}), result.get("parts", {})
    budget = MAX_NOTEBOOK_OUTPUT
    for index, cell in enumerate(nb.cells):
        if cell.get("cell_type") != "code":
            continue
        cell["execution_count"] = None
        gid = _grade_id(cell)
        if gid in part_of_cell and cell.metadata.get("nbgrader", {}).get("grade"):
            cell["outputs"] = graded_outputs(lab_id, part_of_cell[gid], parts.get(part_of_cell[gid]))
            continue
        outputs = [o for o in (clean_output(o) for o in cell_outputs.get(str(index), [])[:MAX_OUTPUTS]) if o is not None]
        size = len(json.dumps(outputs))
        if size > budget:
            outputs = [nbformat.v4.new_output("stream", name="stdout", text="[outputs left out: the notebook's outputs "
                                              "are over the grader's size limit]")]
        budget -= min(size, budget)
        what = broken.get(str(index))
        if what == "timeout":
            outputs.append(nbformat.v4.new_output("error", ename=TIMEOUT_ENAME, evalue="this cell ran longer than the time "
                                                  "allowed and was stopped; the notebook was then run again without it",
                                                  traceback=[]))
        elif what == "crash":
            outputs.append(nbformat.v4.new_output("error", ename=CRASH_ENAME, evalue="the Python process died while running "
                                                  "this cell (os._exit, a crash or out of memory); the notebook was then run "
                                                  "again without it", traceback=[]))
        cell["outputs"] = outputs


def graded_outputs(lab_id: str, part: str, outcome: dict | None) -> list:
    """A graded cell's outputs, all written here: the count, each failed test's name and message, the
    part's figure, and an error when it did not pass (which is what makes nbgrader give zero)."""
    outcome = outcome or {"ok": False, "passed": 0, "total": 0, "failures": [], "error": "the part was not run"}
    lines = [f"{lab_id} / {part}: {outcome.get('passed', 0)} of {outcome.get('total', 0)} hidden tests passed"]
    lines += [f"  FAILED {name}: {message}" for name, message in outcome.get("failures", [])]
    if outcome.get("error"):
        lines.append(f"  {outcome['error']}")
    outputs = [nbformat.v4.new_output("stream", name="stdout", text="\n".join(lines) + "\n")]
    for png in outcome.get("figures", []):
        outputs.append(nbformat.v4.new_output("display_data", data={"image/png": png, "text/plain": "<the part's timing plot>"}))
    if not outcome.get("ok"):
        failed = len(outcome.get("failures", []))
        why = f"{failed} hidden test(s) failed" if failed else outcome.get("error") or "the hidden tests did not pass"
        outputs.append(nbformat.v4.new_output("error", ename="AssertionError", evalue=f"{lab_id} / {part}: {why}",
                                              traceback=[f"AssertionError: {lab_id} / {part}: {why}"]))
    return outputs


def read_scores(course: Path, lab: str, student: str, graded_nb, parts, notes) -> dict[str, float]:
    """nbgrader's scores, with one check of our own: a graded cell earns its points only if the
    hidden tests really reported from it (a graded cell with no output, or whose run_hidden_tests
    a submission replaced, is not a pass). Corrections are written back so feedback agrees."""
    from nbgrader.api import Gradebook

    outputs = {_grade_id(c): "".join(o.get("text", "") for o in c.get("outputs", []) if o.get("output_type") == "stream")
               for c in graded_nb.cells if _grade_id(c)}
    scores = {}
    with Gradebook(f"sqlite:///{course}/gradebook.db", "effml") as gb:
        for gid, _, _ in parts:
            grade = gb.find_grade(gid, lab, lab, student)
            score = float(grade.score or 0)
            reported = PASSED_LINE.search(outputs.get(gid, ""))
            if score > 0 and not (reported and reported[1] == reported[2]):
                notes.append(f"{gid}: no score, because its hidden tests did not report a result")
                grade.manual_score, grade.needs_manual_grade, score = 0.0, False, 0.0
            scores[gid] = score
        gb.db.commit()
    return scores


def describe_broken_cells(graded_nb) -> list[str]:
    notes = []
    for index, cell in enumerate(graded_nb.cells):
        for out in cell.get("outputs", []):
            if out.get("output_type") == "error" and out.get("ename") in (TIMEOUT_ENAME, CRASH_ENAME):
                what = "timed out" if out["ename"] == TIMEOUT_ENAME else "crashed its process"
                notes.append(f"cell {index + 1} ({_grade_id(cell) or 'your code'}) {what}")
    return notes


# --- feedback and grades ----------------------------------------------------------------------

def write_feedback(path: Path, nbgrader_dir: Path, lab, student, status, scores, parts, notes) -> None:
    """nbgrader's feedback page with a summary on top, or the summary alone if there is no page."""
    total, maximum = sum(scores.values()), sum(p for _, p, _ in parts)
    rows = "".join(f"<tr><td>{html.escape(label)}</td><td style='text-align:right'>{scores[gid]:g} / {pts:g}</td></tr>"
                   for gid, pts, label in parts)
    items = "".join(f"<li>{html.escape(n)}</li>" for n in notes)
    summary = (f"<div style='{FEEDBACK_STYLE}'><h2>{html.escape(lab)}: {total:g} / {maximum:g} points</h2>"
               f"<p>Student: <b>{html.escape(student)}</b>. Status: {html.escape(status)}.</p>"
               f"<table>{rows}</table>" + (f"<p>What the grader noticed:</p><ul>{items}</ul>" if notes else "")
               + "<p>Each graded cell below shows which hidden tests passed and why the others failed.</p></div>")
    page = nbgrader_dir / f"{lab}.html"
    if page.is_file():
        text = page.read_text()
        text = re.sub(r"(<body[^>]*>)", lambda m: m[1] + summary, text, count=1)
    else:
        text = f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(lab)}</title></head><body>{summary}</body></html>"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def write_csv(path: Path, results: list[Result], parts) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["student", "score", "max_score", "status", *[f"{gid} ({pts:g})" for gid, pts, _ in parts], "notes"])
        for r in sorted(results, key=lambda r: r.student):
            writer.writerow([r.student, f"{sum(r.scores.values()):g}", f"{sum(p for _, p, _ in parts):g}", r.status,
                             *[f"{r.scores[gid]:g}" for gid, _, _ in parts], "; ".join(r.notes)])


# --- the whole class --------------------------------------------------------------------------

def graded_parts(source) -> list[tuple[str, float, str]]:
    """(grade_id, points, the heading above it) of each graded cell, in notebook order."""
    parts, heading = [], ""
    for cell in source.cells:
        if cell.cell_type == "markdown" and cell.source.startswith("## "):
            heading = cell.source.splitlines()[0][3:].strip()
        elif cell.metadata.get("nbgrader", {}).get("grade"):
            parts.append((_grade_id(cell), float(cell.metadata.nbgrader.get("points", 0)), heading or _grade_id(cell)))
    return parts


def prepare(lab: str, work: Path, cell_timeout: int):
    """One template course with the lab generated into its gradebook, copied per student."""
    template = work / "template"
    write_course(template, lab, cell_timeout)
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    with open(work / "generate.log", "w") as log:
        problem = nbgrader(["generate_assignment", lab, "--force"], template, env, 600, log)
    if problem:
        raise SystemExit(f"{problem}: {(work / 'generate.log').read_text()[-2000:]}")
    release = nbformat.read(template / "release" / lab / f"{lab}.ipynb", as_version=4)
    source = nbformat.read(template / "source" / lab / f"{lab}.ipynb", as_version=4)
    return template, release, graded_parts(source)


def main(argv=None) -> int:
    cores = os.cpu_count() or 1
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("lab", help="a lab under solutions/, e.g. lab01_transformer_basics")
    parser.add_argument("submissions", type=Path, help="a folder of submissions or an LMS zip")
    parser.add_argument("--out", type=Path, default=None, help="where results go (default: graded/<lab>)")
    parser.add_argument("--jobs", type=int, default=cores, help=f"students graded at once (default: cores, {cores})")
    parser.add_argument("--cell-timeout", type=int, default=300, help="seconds one cell may run (default 300)")
    parser.add_argument("--student-timeout", type=int, default=1800, help="seconds one student may take (default 1800)")
    parser.add_argument("--memory-gb", type=float, default=8.0, help="address-space cap per student (default 8; 0: none)")
    parser.add_argument("--keep-work", action="store_true", help="keep the per-student nbgrader course folders")
    opts = parser.parse_args(argv)

    if not (ROOT / "solutions" / opts.lab).is_dir():
        labs = sorted(p.name for p in (ROOT / "solutions").iterdir() if p.is_dir())
        parser.error(f"lab: no solutions/{opts.lab}; the labs are {', '.join(labs)}")
    if not opts.submissions.exists():
        parser.error(f"submissions: {opts.submissions} does not exist")
    if opts.jobs < 1 or opts.cell_timeout < 1 or opts.student_timeout < 1:
        parser.error("--jobs, --cell-timeout and --student-timeout must be at least 1")
    opts.threads = max(1, cores // opts.jobs)
    out = (opts.out or Path("graded") / opts.lab).resolve()
    for sub in ("feedback", "autograded", "logs"):
        shutil.rmtree(out / sub, ignore_errors=True)
        (out / sub).mkdir(parents=True)

    start = time.perf_counter()
    subs = collect(opts.submissions, opts.lab)
    print(f"{len(subs)} submissions from {opts.submissions}; grading {opts.jobs} at a time")
    work = Path(tempfile.mkdtemp(prefix="effml-autograde-"))
    opts.sandbox_work = work / "sandbox"
    # What no sandbox may see even where it lies under a folder the sandbox is given.
    opts.secrets = [ROOT, ROOT / "grading", ROOT / "solutions", opts.submissions.resolve(), out, work, ROOT / "gradebook.db"]
    if os.environ.get("EFFML_HIDDEN_TESTS"):
        opts.secrets.append(Path(os.environ["EFFML_HIDDEN_TESTS"]).resolve())
    try:
        from parts import lab_of, library_names
        from sandbox import bubblewrap, library_without

        library_without(library_names(lab_of(opts.lab)), opts.sandbox_work / "lib")
        if bubblewrap() is None:
            print("WARNING: no working bubblewrap (bwrap) on this machine: students' code will run WITHOUT a sandbox, "
                  "with your user's rights. Install it (Debian/Ubuntu: sudo apt-get install bubblewrap) before grading "
                  "a class you do not trust.", file=sys.stderr, flush=True)
        template, release, parts = prepare(opts.lab, work, opts.cell_timeout)
        with concurrent.futures.ThreadPoolExecutor(opts.jobs) as pool:
            futures = {pool.submit(grade_one, s, opts.lab, template, work, out, release, parts, opts): s for s in subs}
            results = []
            for future in concurrent.futures.as_completed(futures):
                sub = futures[future]
                try:
                    result = future.result()
                except Exception as err:  # a bug of ours must not lose the student either
                    result = Result(sub.student, "not graded", {gid: 0.0 for gid, _, _ in parts},
                                    [*sub.notes, f"grader error: {type(err).__name__}: {err}"], 0.0)
                    write_feedback(out / "feedback" / sub.student / f"{opts.lab}.html", work / "none", opts.lab,
                                   sub.student, result.status, result.scores, parts, result.notes)
                results.append(result)
                print(f"  {result.student}: {sum(result.scores.values()):g} / {sum(p for _, p, _ in parts):g}"
                      f" ({result.status}, {result.seconds:.0f} s)", flush=True)
    finally:
        if opts.keep_work:
            print(f"nbgrader course folders kept in {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    write_csv(out / "grades.csv", results, parts)
    minutes = (time.perf_counter() - start) / 60
    print(f"graded {len(results)} in {minutes:.1f} min ({len(results) / minutes:.1f} per minute); "
          f"grades: {out / 'grades.csv'}, feedback: {out / 'feedback'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
