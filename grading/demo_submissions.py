"""A class of made-up submissions to lab 01, honest and hostile, zipped as Moodle and Canvas export them.

    python grading/demo_submissions.py OUT.zip

`make grade-demo` grades this zip, and tests/test_autograde.py checks the exact scores each gets.
Every submission starts from the released notebook, as a student's would, with its solution
cells filled in. EXPECTED is what each must score, part by part (p1…p5 are worth 3, 2, 2, 3, 2).
"""

import json
import re
import sys
import zipfile
from pathlib import Path

import nbformat

ROOT = Path(__file__).resolve().parents[1]
LAB = "lab01_transformer_basics"

# Student -> points per graded cell. The reasons are the point of each case.
EXPECTED = {
    "solution": {"p1_tests": 3, "p2_tests": 2, "p3_tests": 2, "p4_tests": 3, "p5_tests": 2},
    "blank": {"p1_tests": 0, "p2_tests": 0, "p3_tests": 0, "p4_tests": 0, "p5_tests": 0},
    # LayerNorm instead of RMSNorm: part 2 fails, and so does the block built on it.
    "wrong_rmsnorm": {"p1_tests": 3, "p2_tests": 0, "p3_tests": 2, "p4_tests": 0, "p5_tests": 2},
    # The block never returns: only part 4 is lost, after the per-cell timeout.
    "infinite_loop": {"p1_tests": 3, "p2_tests": 2, "p3_tests": 2, "p4_tests": 0, "p5_tests": 2},
    # swiglu kills the kernel: parts 3 and 4 (which calls swiglu) are lost; the rest still counts.
    "kernel_crash": {"p1_tests": 3, "p2_tests": 2, "p3_tests": 0, "p4_tests": 0, "p5_tests": 2},
    # Graded cells edited, deleted and forged; visible tests deleted: all restored, graded as the lab.
    "edited_tests": {"p1_tests": 3, "p2_tests": 2, "p3_tests": 2, "p4_tests": 3, "p5_tests": 2},
    # A torch.py and an effml_lib/ beside the notebook must not be imported.
    "stray_files": {"p1_tests": 3, "p2_tests": 2, "p3_tests": 2, "p4_tests": 3, "p5_tests": 2},
    # Attention that calls the library's: every part that runs it (1, 4 and 5) scores zero.
    "library_call": {"p1_tests": 0, "p2_tests": 2, "p3_tests": 2, "p4_tests": 0, "p5_tests": 0},
    # Warnings and stderr output cost nothing.
    "noisy_warnings": {"p1_tests": 3, "p2_tests": 2, "p3_tests": 2, "p4_tests": 3, "p5_tests": 2},
    # Nothing gradable: still a row in the CSV, with zero and a reason.
    "not_a_notebook": {"p1_tests": 0, "p2_tests": 0, "p3_tests": 0, "p4_tests": 0, "p5_tests": 0},
    "only_a_pdf": {"p1_tests": 0, "p2_tests": 0, "p3_tests": 0, "p4_tests": 0, "p5_tests": 0},
}


def solution_code() -> dict[str, str]:
    """grade_id -> the solution cell's code, from the nbgrader source, markers removed."""
    source = nbformat.read(ROOT / "solutions" / LAB / f"{LAB}.ipynb", as_version=4)
    return {c.metadata.nbgrader.grade_id: re.sub(r"\n? *### (BEGIN|END) SOLUTION", "", c.source)
            for c in source.cells if c.metadata.get("nbgrader", {}).get("solution")}


def release():
    return nbformat.read(ROOT / "labs" / LAB / f"{LAB}.ipynb", as_version=4)


def filled(changes: dict[str, str] | None = None):
    """The release with every solution cell answered; ``changes`` replaces some answers."""
    nb, answers = release(), {**solution_code(), **(changes or {})}
    for cell in nb.cells:
        gid = cell.metadata.get("nbgrader", {}).get("grade_id")
        if gid in answers and cell.metadata.nbgrader.get("solution"):
            cell.source = answers[gid]
    return nb


def cell(nb, grade_id):
    return next(c for c in nb.cells if c.metadata.get("nbgrader", {}).get("grade_id") == grade_id)


def edited_tests():
    nb = filled()
    cell(nb, "p1_tests").source = "passed = 3  # full marks, surely"
    cell(nb, "p1_visible").source = 'print("part 1: visible tests passed")'
    renamed = cell(nb, "p4_tests").metadata.nbgrader
    renamed["grade_id"], renamed["points"] = "p4_renamed", 50
    nb.cells = [c for c in nb.cells if c.metadata.get("nbgrader", {}).get("grade_id") not in ("p2_tests", "p3_visible")]
    forged = nbformat.v4.new_code_cell("print('bonus')")
    forged.metadata["nbgrader"] = {"grade": True, "grade_id": "bonus", "locked": False, "points": 100,
                                   "schema_version": 3, "solution": False, "task": False}
    nb.cells.append(forged)
    return nb


def submissions() -> dict[str, dict[str, bytes]]:
    """Student -> {file name: bytes}."""
    sol = solution_code()
    as_bytes = lambda nb: nbformat.writes(nb).encode()  # noqa: E731
    nb_name = f"{LAB}.ipynb"
    return {
        "solution": {nb_name: as_bytes(filled())},
        "blank": {nb_name: as_bytes(release())},
        "wrong_rmsnorm": {nb_name: as_bytes(filled({"p2_solution": (
            "def rms_norm(x, weight, eps=1e-5):\n"
            "    xf = x.float() - x.float().mean(-1, keepdim=True)  # LayerNorm's centring: not RMSNorm\n"
            "    return weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)")}))},
        "infinite_loop": {nb_name: as_bytes(filled({"p4_solution": (
            "def decoder_block(x, block, rope_cos, rope_sin):\n    while True:\n        pass")}))},
        "kernel_crash": {nb_name: as_bytes(filled({"p3_solution": (
            "import os\n\ndef swiglu(x, w1, w2, w3):\n    os._exit(1)")}))},
        "edited_tests": {nb_name: as_bytes(edited_tests())},
        "stray_files": {
            nb_name: as_bytes(filled()),
            "torch.py": b'raise SystemExit("a stray torch.py beside the notebook was imported")\n',
            "effml_lib/__init__.py": b'raise SystemExit("a stray effml_lib beside the notebook was imported")\n',
        },
        "library_call": {nb_name: as_bytes(filled({"p1_solution": (
            "from effml_lib.attention import attention\n\n"
            "def causal_attention(q, k, v):\n    return attention(q, k, v, causal=True)")}))},
        "noisy_warnings": {nb_name: as_bytes(filled({
            "p1_solution": "import sys, warnings\n" + sol["p1_solution"].replace(
                "def causal_attention(q, k, v):\n",
                "def causal_attention(q, k, v):\n    warnings.warn('attention: this warning costs nothing')\n"
                "    print('noise on stderr', file=sys.stderr)\n")}))},
        "not_a_notebook": {nb_name: b"{ this is not json"},
        "only_a_pdf": {"report.pdf": b"%PDF-1.4 not really"},
    }


def write_zip(path: Path) -> Path:
    """Moodle's layout (a folder per student), except `blank`, which comes as Canvas names it."""
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
        files_of = submissions()
        for student in EXPECTED:
            number = expected_number(student)
            for name, data in files_of[student].items():
                if student == "blank":
                    archive.writestr(f"blank_{number}_{number + 5000}_{name}", data)
                else:
                    archive.writestr(f"{student}_{number}_assignsubmission_file_/{name}", data)
    return path


def expected_student_id(student: str) -> str:
    """The id the driver gives each zip entry (Moodle keeps the number, Canvas drops it)."""
    return student if student == "blank" else f"{student}_{expected_number(student)}"


def expected_number(student: str) -> int:
    return 1001 + list(EXPECTED).index(student)


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    print(json.dumps({"wrote": str(write_zip(Path(sys.argv[1]))), "students": len(EXPECTED)}))
