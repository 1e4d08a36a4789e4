"""A class of made-up submissions to a lab, honest and hostile, zipped as Moodle and Canvas export them.

    python grading/demo_submissions.py OUT.zip [LAB]      # LAB defaults to lab01_transformer_basics

`make grade-demo` grades lab 01's zip, and tests/test_autograde.py checks the exact scores each
student of every lab's class gets. Every submission starts from the released notebook, as a
student's would, with its solution cells filled in. ``CLASSES[lab]["expected"]`` is what each must
score, part by part. A class holds two kinds of cases:

- ``LAB_CASES``, in every lab's class: what depends on the lab's own code and hidden tests. The
  solution scores full marks, the blank release zero, a realistic wrong answer loses the parts that
  use it (with its hidden test's message), and an answer that calls the library's own implementation
  loses every part that runs it.
- ``GRADER_CASES``, in lab 01's class only (``GRADER_LAB``): the grader's guarantees, which hold
  whatever the lab, because the code that keeps them never looks at the lab: a cell that never
  returns, a kernel that dies, edited, deleted and forged test cells, stray files beside the
  notebook, warnings and stderr, a file that is no notebook, no notebook at all. One lab proves them;
  grading them for every lab would cost minutes per lab and could catch nothing more.
"""

import json
import re
import sys
import zipfile
from pathlib import Path

import nbformat

sys.path.insert(0, str(Path(__file__).resolve().parent))
import hostile_submissions as hostile  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
LAB = "lab01_transformer_basics"  # the demo's default

FULL_LAB01 = {"p1_tests": 3, "p2_tests": 2, "p3_tests": 2, "p4_tests": 3, "p5_tests": 2}
FULL_LAB02 = {"p1_tests": 3, "p2_tests": 3, "p3_tests": 2, "p4_tests": 2, "p5_tests": 2}
FULL_LAB03 = {"p1_tests": 3, "p2_tests": 3, "p3_tests": 3, "p4_tests": 3, "p5_tests": 2}
FULL_LAB04 = {"p1_tests": 3, "p2_tests": 2, "p3_tests": 3, "p4_tests": 2}
FULL_LAB05 = {"p1_tests": 3, "p2_tests": 2, "p3_tests": 2, "p4_tests": 3, "p5_tests": 2}
ZERO = dict.fromkeys(FULL_LAB01, 0)

LAB_CASES = ("solution", "blank", "wrong_*", "library_call")  # wrong_<what the mistake is>
GRADER_CASES = ("infinite_loop", "kernel_crash", "edited_tests", "stray_files", "noisy_warnings",
                "not_a_notebook", "only_a_pdf",
                # the hostile class (grading/hostile_submissions.py), and the archive's own troubles
                *hostile.CASES, "bom_notebook", "twin_solution", "twin_blank", "damaged_member")
GRADER_LAB = "lab01_transformer_basics"

# For each lab: student -> points per graded cell (the reasons are the point of each case), and the
# answers that make each case: "wrong" and "library_call" for every lab, and for GRADER_LAB also
# "infinite_loop", "kernel_crash", "noisy" (the cell and the line after which the noise goes) and
# "edited" (the cells the edited_tests student tampers with).
CLASSES = {
    "lab01_transformer_basics": {
        "expected": {
            # -- LAB_CASES
            "solution": FULL_LAB01,
            "blank": ZERO,
            # LayerNorm instead of RMSNorm: part 2 fails, and so does the block built on it.
            "wrong_rmsnorm": {**FULL_LAB01, "p2_tests": 0, "p4_tests": 0},
            # Attention that calls the library's: every part that runs it (1, 4 and 5) scores zero.
            "library_call": {**FULL_LAB01, "p1_tests": 0, "p4_tests": 0, "p5_tests": 0},
            # -- GRADER_CASES (this lab only)
            # The block never returns: only part 4 is lost (its visible test and its graded cell both
            # hang, each until the per-cell timeout).
            "infinite_loop": {**FULL_LAB01, "p4_tests": 0},
            # swiglu kills the kernel: parts 3 and 4 (which calls swiglu) are lost; the rest still counts.
            "kernel_crash": {**FULL_LAB01, "p3_tests": 0, "p4_tests": 0},
            # Graded cells edited, deleted and forged; visible tests deleted: all restored, graded as the lab.
            "edited_tests": FULL_LAB01,
            # A torch.py and an effml_lib/ beside the notebook must not be imported.
            "stray_files": FULL_LAB01,
            # Warnings and stderr output cost nothing.
            "noisy_warnings": FULL_LAB01,
            # Nothing gradable: still a row in the CSV, with zero and a reason.
            "not_a_notebook": ZERO,
            "only_a_pdf": ZERO,
            # -- the hostile class: see grading/hostile_submissions.py for what each tries
            **hostile.EXPECTED,
            # A UTF-8 byte-order mark before the JSON: read, graded as any other.
            "bom_notebook": FULL_LAB01,
            # Two Canvas students of one name ("twin"), told apart by their user ids.
            "twin_solution": FULL_LAB01,
            "twin_blank": ZERO,
            # This student's notebook is damaged inside the zip: zero and a note; everyone else is graded.
            "damaged_member": ZERO,
        },
        "wrong": {"p2_solution": (
            "def rms_norm(x, weight, eps=1e-5):\n"
            "    xf = x.float() - x.float().mean(-1, keepdim=True)  # LayerNorm's centring: not RMSNorm\n"
            "    return weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)")},
        "infinite_loop": {"p4_solution": "def decoder_block(x, block, rope_cos, rope_sin, lengths=None):\n    while True:\n        pass"},
        "kernel_crash": {"p3_solution": "import os\n\ndef swiglu(x, w1, w2, w3):\n    os._exit(1)"},
        "library_call": {"p1_solution": ("from effml_lib.attention import attention as library_attention\n\n"
                                         "def attention(q, k, v, causal=True, mask=None):\n"
                                         "    return library_attention(q, k, v, causal=causal, mask=mask)")},
        "noisy": ("p1_solution", "def attention(q, k, v, causal=True, mask=None):\n"),
        "edited": {"forged": "p1_tests", "visible": "p1_visible", "renamed": "p4_tests", "deleted": ("p2_tests", "p3_visible")},
    },
    "lab02_rope": {
        "expected": {
            "solution": FULL_LAB02,
            "blank": ZERO,
            # The interleaved pairing ignored (always half-split): only part 2 checks it.
            "wrong_pairing": {**FULL_LAB02, "p2_tests": 0},
            # apply_rope that calls the library's: every part that runs it (2, 4 and 5) scores zero.
            "library_call": {**FULL_LAB02, "p2_tests": 0, "p4_tests": 0, "p5_tests": 0},
        },
        "wrong": {"p2_solution": (
            "def apply_rope(x, cos, sin, positions=None, interleaved=False):\n"
            "    positions = torch.arange(x.shape[2]) if positions is None else positions\n"
            "    c, s = cos[positions], sin[positions]\n"
            "    if positions.dim() == 2:\n        c, s = c[:, None], s[:, None]\n"
            "    x1, x2 = x.float().chunk(2, dim=-1)  # always half-split: interleaved is ignored\n"
            "    return torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1).to(x.dtype)")},
        "library_call": {"p2_solution": (
            "from effml_lib.rope import apply_rope as library_apply_rope\n\n"
            "def apply_rope(x, cos, sin, positions=None, interleaved=False):\n"
            "    return library_apply_rope(x, cos, sin, positions, interleaved)")},
    },
    "lab03_kv_cache": {
        "expected": {
            "solution": FULL_LAB03,
            "blank": dict.fromkeys(FULL_LAB03, 0),
            # Every sequence written at sequence 0's positions: the cache fails, and so does batched
            # decoding of different-length prompts; part 3 runs on the tests' own cache and part 5 on one
            # sequence, so both still count.
            "wrong_positions": {**FULL_LAB03, "p2_tests": 0, "p4_tests": 0},
            # Decoding with the library's cache and the model's own cached forward: parts 4 and 5 score zero.
            "library_call": {**FULL_LAB03, "p4_tests": 0, "p5_tests": 0},
        },
        "wrong": {"p2_solution": (
            "class StaticKVCache:\n"
            "    def __init__(self, n_layers, batch_size, max_seq_len, n_kv_heads, head_dim, dtype=torch.float32):\n"
            "        shape = (batch_size, n_kv_heads, max_seq_len, head_dim)\n"
            "        self.k = [torch.zeros(shape, dtype=dtype) for _ in range(n_layers)]\n"
            "        self.v = [torch.zeros(shape, dtype=dtype) for _ in range(n_layers)]\n"
            "        self.max_seq_len = max_seq_len\n\n"
            "    def update(self, layer, k_new, v_new, positions):\n"
            "        if positions.min() < 0 or positions.max() >= self.max_seq_len:\n"
            "            raise ValueError(f'positions must lie in [0, {self.max_seq_len})')\n"
            "        if k_new.shape[2] != positions.shape[1] or k_new.shape[1] != self.k[layer].shape[1]:\n"
            "            raise ValueError('k_new has the wrong shape')\n"
            "        where = positions[0]  # every sequence at sequence 0's positions\n"
            "        self.k[layer][:, :, where] = k_new\n"
            "        self.v[layer][:, :, where] = v_new\n"
            "        return self.k[layer], self.v[layer], (positions[:, -1] + 1).to(torch.int32)")},
        "library_call": {"p4_solution": (
            "from effml_lib.kvcache import StaticKVCache\n\n"
            "def generate_greedy(model, prompts, max_new_tokens):\n"
            "    out = []\n"
            "    with torch.no_grad():\n"
            "        for prompt in prompts:\n"
            "            cache = StaticKVCache.for_model(model, 1, len(prompt) + max_new_tokens)\n"
            "            new = [int(model(torch.tensor([prompt]), cache, 0)[0, -1].argmax())]\n"
            "            for step in range(1, max_new_tokens):\n"
            "                logits = model(torch.tensor([[new[-1]]]), cache, len(prompt) + step - 1)\n"
            "                new.append(int(logits[0, -1].argmax()))\n"
            "            out.append(new)\n"
            "    return out")},
    },
    "lab04_gqa": {
        "expected": {
            "solution": FULL_LAB04,
            "blank": dict.fromkeys(FULL_LAB04, 0),
            # Query head h reads KV head h % Hkv (interleaved groups): part 1 fails; part 4 runs MQA, where
            # every grouping is the same, so it still counts.
            "wrong_groups": {**FULL_LAB04, "p1_tests": 0},
            # The conversion is the library's mha_to_gqa: part 3 scores zero.
            "library_call": {**FULL_LAB04, "p3_tests": 0},
        },
        "wrong": {"p1_solution": (
            "def attention(q, k, v, causal=True, mask=None):\n"
            "    b, h, tq, d = q.shape\n"
            "    h_kv, tk = k.shape[1], k.shape[2]\n"
            "    g = h // h_kv\n"
            "    # heads h, h + Hkv, h + 2 Hkv, ... share a KV head: interleaved, not adjacent\n"
            "    q_grouped = q.float().view(b, g, h_kv, tq, d).transpose(1, 2).reshape(b, h_kv, g * tq, d)\n"
            "    scores = q_grouped @ k.float().transpose(-2, -1) / math.sqrt(d)\n"
            "    scores = scores.view(b, h_kv, g, tq, tk)\n"
            "    if causal:\n"
            "        scores = scores.masked_fill(~torch.ones(tq, tk, dtype=torch.bool).tril(tk - tq), float('-inf'))\n"
            "    if mask is not None:  # the mask's heads in the same interleaved order\n"
            "        grouped = torch.broadcast_to(mask, (b, h, tq, tk)).view(b, g, h_kv, tq, tk).transpose(1, 2)\n"
            "        scores = scores.masked_fill(~grouped, float('-inf'))\n"
            "    out = scores.view(b, h_kv, g * tq, tk).softmax(-1).nan_to_num(0.0) @ v.float()\n"
            "    return out.view(b, h_kv, g, tq, d).transpose(1, 2).reshape(b, h, tq, d).to(q.dtype)")},
        "library_call": {"p3_solution": (
            "from effml_lib.attention import mha_to_gqa  # the library's own conversion, as the answer")},
    },
}
CLASSES["lab05_quantization"] = {
    "expected": {
        "solution": FULL_LAB05,
        "blank": dict.fromkeys(FULL_LAB05, 0),
        # Q4_1's nibbles read in pack_int4's order (neighbours, not halves): part 3 fails; nothing else uses it.
        "wrong_q4_1_order": {**FULL_LAB05, "p3_tests": 0},
        # quantize and dequantize are the library's: part 1 scores zero, and so do parts 4 and 5, whose
        # QuantLinear.from_linear quantizes with that quantize.
        "library_call": {**FULL_LAB05, "p1_tests": 0, "p4_tests": 0, "p5_tests": 0},
    },
    "wrong": {"p3_solution": (
        "def dequantize_q4_1(blocks):\n"
        "    if blocks.shape[-1] != 20:\n"
        "        raise ValueError('blocks must have shape (..., 20)')\n"
        "    b = blocks.contiguous()\n"
        "    d = b[..., 0:2].view(torch.float16).float()\n"
        "    m = b[..., 2:4].view(torch.float16).float()\n"
        "    q = unpack_int4(b[..., 4:]).float()  # part 2's order: weights 2j and 2j + 1 in byte j\n"
        "    return d * q + m")},
    "library_call": {"p1_solution": (
        "from effml_lib.quant import dequantize, quantize  # the library's own, as the answer")},
}
EXPECTED = CLASSES[LAB]["expected"]


def solution_code(lab: str = LAB) -> dict[str, str]:
    """grade_id -> the solution cell's code, from the nbgrader source, markers removed."""
    source = nbformat.read(ROOT / "solutions" / lab / f"{lab}.ipynb", as_version=4)
    return {c.metadata.nbgrader.grade_id: re.sub(r"\n? *### (BEGIN|END) SOLUTION", "", c.source)
            for c in source.cells if c.metadata.get("nbgrader", {}).get("solution")}


def release(lab: str = LAB):
    return nbformat.read(ROOT / "labs" / lab / f"{lab}.ipynb", as_version=4)


def filled(changes: dict[str, str] | None = None, lab: str = LAB):
    """The release with every solution cell answered; ``changes`` replaces some answers."""
    nb, answers = release(lab), {**solution_code(lab), **(changes or {})}
    for cell in nb.cells:
        gid = cell.metadata.get("nbgrader", {}).get("grade_id")
        if gid in answers and cell.metadata.nbgrader.get("solution"):
            cell.source = answers[gid]
    return nb


def cell(nb, grade_id):
    return next(c for c in nb.cells if c.metadata.get("nbgrader", {}).get("grade_id") == grade_id)


def edited_tests(lab: str = LAB):
    edited = CLASSES[lab]["edited"]
    nb = filled(lab=lab)
    cell(nb, edited["forged"]).source = "passed = 3  # full marks, surely"
    cell(nb, edited["visible"]).source = 'print("visible tests passed")'
    renamed = cell(nb, edited["renamed"]).metadata.nbgrader
    renamed["grade_id"], renamed["points"] = "renamed", 50
    nb.cells = [c for c in nb.cells if c.metadata.get("nbgrader", {}).get("grade_id") not in edited["deleted"]]
    forged = nbformat.v4.new_code_cell("print('bonus')")
    forged.metadata["nbgrader"] = {"grade": True, "grade_id": "bonus", "locked": False, "points": 100,
                                   "schema_version": 3, "solution": False, "task": False}
    nb.cells.append(forged)
    return nb


def hostile_cases(lab: str = GRADER_LAB) -> dict:
    def add_cell(nb, source):
        nb.cells.append(nbformat.v4.new_code_cell(source))

    def release_cell(nb, grade_id):
        return nbformat.from_dict(next(c for c in release(lab).cells if c.metadata.get("nbgrader", {}).get("grade_id") == grade_id))

    return hostile.cases(lambda changes=None: filled(changes, lab), release_cell, add_cell, lambda: solution_code(lab))


def wrong_case(lab: str = LAB) -> str:
    """The name of the lab's wrong answer, e.g. "wrong_rmsnorm"."""
    return next(s for s in CLASSES[lab]["expected"] if s.startswith("wrong_"))


def submissions(lab: str = LAB) -> dict[str, dict[str, bytes]]:
    """Student -> {file name: bytes}, for each student of the lab's class."""
    spec = CLASSES[lab]
    nb_name = f"{lab}.ipynb"

    def notebook(nb, **beside):
        return {nb_name: nbformat.writes(nb).encode(), **beside}

    def noisy():
        noisy_cell, noisy_def = spec["noisy"]
        return filled({noisy_cell: "import sys, warnings\n" + solution_code(lab)[noisy_cell].replace(
            noisy_def, noisy_def + "    warnings.warn('this warning costs nothing')\n"
            "    print('noise on stderr', file=sys.stderr)\n")}, lab)

    make = {  # built only for the students the class has: GRADER_CASES' answers exist for GRADER_LAB only
        "solution": lambda: notebook(filled(lab=lab)),
        "blank": lambda: notebook(release(lab)),
        wrong_case(lab): lambda: notebook(filled(spec["wrong"], lab)),
        "library_call": lambda: notebook(filled(spec["library_call"], lab)),
        "infinite_loop": lambda: notebook(filled(spec["infinite_loop"], lab)),
        "kernel_crash": lambda: notebook(filled(spec["kernel_crash"], lab)),
        "edited_tests": lambda: notebook(edited_tests(lab)),
        "stray_files": lambda: notebook(filled(lab=lab), **{
            "torch.py": b'raise SystemExit("a stray torch.py beside the notebook was imported")\n',
            "effml_lib/__init__.py": b'raise SystemExit("a stray effml_lib beside the notebook was imported")\n'}),
        "noisy_warnings": lambda: notebook(noisy()),
        "not_a_notebook": lambda: {nb_name: b"{ this is not json"},
        "only_a_pdf": lambda: {"report.pdf": b"%PDF-1.4 not really"},
        "bom_notebook": lambda: {nb_name: b"\xef\xbb\xbf" + nbformat.writes(filled(lab=lab)).encode()},
        "twin_solution": lambda: notebook(filled(lab=lab)),
        "twin_blank": lambda: notebook(release(lab)),
        "damaged_member": lambda: notebook(filled(lab=lab)),
    }
    if lab == GRADER_LAB:
        for student, (nb, _) in hostile_cases(lab).items():
            make[student] = lambda nb=nb: notebook(nb)
    return {student: make[student]() for student in spec["expected"]}


# Students whose files come as Canvas names them (a flat file: name_userid_submissionid_file), and
# the Canvas name each has: the twins share one.
CANVAS = {"blank": "blank", "twin_solution": "twin", "twin_blank": "twin"}


def write_zip(path: Path, lab: str = LAB) -> Path:
    """Moodle's layout (a folder per student), except the CANVAS students; then the damaged member's
    compressed bytes are spoiled, as a broken download or upload leaves them."""
    damaged = None
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
        files_of = submissions(lab)
        for student in CLASSES[lab]["expected"]:
            number = expected_number(student, lab)
            for name, data in files_of[student].items():
                member = (f"{CANVAS[student]}_{number}_{number + 5000}_{name}" if student in CANVAS
                          else f"{student}_{number}_assignsubmission_file_/{name}")
                archive.writestr(member, data)
                if student == "damaged_member":
                    damaged = member
    if damaged is not None:
        with zipfile.ZipFile(path) as archive:
            info = archive.getinfo(damaged)
        raw = bytearray(path.read_bytes())
        name_len, extra_len = int.from_bytes(raw[info.header_offset + 26:info.header_offset + 28], "little"), \
            int.from_bytes(raw[info.header_offset + 28:info.header_offset + 30], "little")
        start = info.header_offset + 30 + name_len + extra_len
        for i in range(start + 20, start + 60):
            raw[i] ^= 0x5A
        path.write_bytes(bytes(raw))
    return path


def expected_student_id(student: str, lab: str = LAB) -> str:
    """The id the driver gives each zip entry: Moodle's folder name and number, Canvas's name and user id."""
    number = expected_number(student, lab)
    return f"{CANVAS[student]}_{number}" if student in CANVAS else f"{student}_{number}"


def expected_number(student: str, lab: str = LAB) -> int:
    return 1001 + list(CLASSES[lab]["expected"]).index(student)


if __name__ == "__main__":
    if len(sys.argv) not in (2, 3) or (len(sys.argv) == 3 and sys.argv[2] not in CLASSES):
        sys.exit(__doc__)
    lab = sys.argv[2] if len(sys.argv) == 3 else LAB
    print(json.dumps({"wrote": str(write_zip(Path(sys.argv[1]), lab)), "students": len(CLASSES[lab]["expected"])}))
