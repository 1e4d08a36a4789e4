"""Every lab's graded parts, in one table: what each asks for, what it hides, what it is worth.

For each lab (the folder name of its hidden suites, ``grading/hidden/<lab>``):

- ``notebook``: the nbgrader assignment (``solutions/<notebook>/``);
- ``ban_sdpa``: PyTorch's fused attention is unavailable in the sandbox (grading/bans.py);
- ``parts``, in notebook order, each with
  - ``part``: the hidden suite, ``grading/hidden/<lab>/test_<part>.py``;
  - ``grade_id``: the graded cell's nbgrader id, whose points this part decides;
  - ``points``;
  - ``library``: the library's own version of what the part asks, its answer key (a lab uses the
    library's name and argument order for it): no notebook prints its source (tests/test_parts.py);
  - ``asks``: the names the student defines for it (what the hidden tests call);
  - ``hides``: the library names whose code the sandbox's copy of ``effml_lib`` lacks while this lab
    is graded (grading/sandbox.py ``library_without``): a function or method is forwarded to the
    grader while the notebook runs and refused while the hidden tests run; a class raises; a module
    does not import;
  - ``timed``: the part times the student's code (it gets an echo worker for the channel's cost);
- ``hide_packages`` (optional): installed packages, or folders of them, that the sandbox must not see
  while the lab is graded, because a function of theirs answers a part (lab 05: gguf's own Q4_1
  decoder, and the copy in transformers' GGUF loader); grading/sandbox.py ``package_folders``.

tools/build_notebooks.py takes each graded cell's points from here, and tests/test_parts.py
checks that every name in the table exists: in the lab's solution, in the library, in the suites.
"""

from __future__ import annotations

# What computes attention, in any form: hidden wherever a lab asks for attention.
_ATTENTION = ("attention.attention", "attention.attention_reference", "attention.decode_attention",
              "attention.decode_attention_unchecked", "attention.Attention.forward",
              "kvcache.StaticKVCache.attention", "kernels.decode_attention")
_ROPE = ("rope.rope_frequencies", "rope.apply_rope", "rope.apply_rope_qk", "rope.apply_rope_qk_unchecked",
         "rope.rotate_reference", "kernels.rope")

PARTS = {
    "lab01": {
        "notebook": "lab01_transformer_basics",
        "ban_sdpa": True,
        "parts": [
            {"part": "attention", "grade_id": "p1_tests", "points": 3, "library": ["attention.attention", "attention.attention_reference"],
             "asks": ["attention"],
             "hides": list(_ATTENTION)},
            {"part": "rmsnorm", "grade_id": "p2_tests", "points": 2, "library": ["model.RMSNorm"],
             "asks": ["rms_norm"],
             "hides": ["model.RMSNorm.forward"]},
            {"part": "swiglu", "grade_id": "p3_tests", "points": 2, "library": ["model.FeedForward"],
             "asks": ["swiglu"],
             "hides": ["model.FeedForward.forward"]},
            {"part": "block", "grade_id": "p4_tests", "points": 3, "library": [],
             "asks": ["decoder_block"],
             "hides": ["model.Block.forward", "model.Transformer.forward", "model.Transformer.forward_unchecked"]},
            {"part": "performance", "grade_id": "p5_tests", "points": 2, "library": [],
             "asks": ["attention"],
             "hides": [], "timed": True},
        ],
    },
    "lab02": {
        "notebook": "lab02_rope",
        "ban_sdpa": False,
        "parts": [
            {"part": "frequencies", "grade_id": "p1_tests", "points": 3, "library": ["rope.rope_frequencies"],
             "asks": ["rope_frequencies"],
             "hides": ["rope.rope_frequencies", "model.Transformer.set_rope", "model.Transformer.rope_tables"]},
            {"part": "apply_rope", "grade_id": "p2_tests", "points": 3, "library": ["rope.apply_rope", "rope.apply_rope_qk", "rope.rotate_reference"],
             "asks": ["apply_rope"],
             "hides": [n for n in _ROPE if n != "rope.rope_frequencies"]},
            {"part": "conversion", "grade_id": "p3_tests", "points": 2, "library": ["rope.permute_qk_weight"],
             "asks": ["permute_qk_weight"],
             "hides": ["rope.permute_qk_weight"]},
            {"part": "distance", "grade_id": "p4_tests", "points": 2, "library": [],
             "asks": ["score_by_distance", "peak_distance"],
             "hides": []},
            {"part": "performance", "grade_id": "p5_tests", "points": 2, "library": [],
             "asks": ["apply_rope"],
             "hides": [], "timed": True},
        ],
    },
    "lab03": {
        "notebook": "lab03_kv_cache",
        "ban_sdpa": False,
        "parts": [
            {"part": "bytes", "grade_id": "p1_tests", "points": 3, "library": ["kvcache.kv_cache_bytes", "kvcache.kv_cache_bytes_per_token"],
             "asks": ["kv_cache_bytes", "sequences_that_fit"],
             "hides": ["kvcache.kv_cache_bytes", "kvcache.kv_cache_bytes_per_token"]},
            {"part": "cache", "grade_id": "p2_tests", "points": 3, "library": ["kvcache.StaticKVCache.update", "kvcache.StaticKVCache.write"],
             "asks": ["StaticKVCache"],
             "hides": ["kvcache.StaticKVCache"]},
            {"part": "forward", "grade_id": "p3_tests", "points": 3, "library": [],
             "asks": ["forward_with_cache"],
             "hides": ["attention.decode_attention", "attention.decode_attention_unchecked", "kernels.decode_attention"]},
            {"part": "generate", "grade_id": "p4_tests", "points": 3, "library": ["decoding.generate"],
             "asks": ["generate_greedy"],
             "hides": ["decoding.generate", "decoding.decode_step"]},
            {"part": "performance", "grade_id": "p5_tests", "points": 2, "library": [],
             "asks": ["generate_greedy"],
             "hides": [], "timed": True},
        ],
    },
    "lab04": {
        "notebook": "lab04_gqa",
        "ban_sdpa": True,
        "parts": [
            {"part": "attention", "grade_id": "p1_tests", "points": 3, "library": ["attention.attention", "attention.attention_reference"],
             "asks": ["attention"],
             "hides": list(_ATTENTION) + ["attention.repeat_kv"]},
            {"part": "pooling", "grade_id": "p2_tests", "points": 2, "library": ["attention.pool_heads"],
             "asks": ["pool_heads"],
             "hides": ["attention.pool_heads"]},
            {"part": "conversion", "grade_id": "p3_tests", "points": 3, "library": ["attention.mha_to_gqa", "attention._attention_to_gqa"],
             "asks": ["mha_to_gqa"],
             "hides": ["attention.mha_to_gqa", "attention._attention_to_gqa"]},
            {"part": "memory", "grade_id": "p4_tests", "points": 2, "library": [],
             "asks": ["attention"],
             "hides": [], "timed": True},
        ],
    },
}

PARTS["lab05"] = {
    "notebook": "lab05_quantization",
    "ban_sdpa": False,
    # gguf.quants.dequantize and transformers' GGUF dequantizer decode Q4_1 blocks: part 3's answer.
    "hide_packages": ["gguf", "transformers.integrations.gguf"],
    "parts": [
        {"part": "quantize", "grade_id": "p1_tests", "points": 3, "library": ["quant.quantize", "quant.dequantize"],
         "asks": ["quantize", "dequantize"],
         "hides": ["quant.quantize", "quant.dequantize"]},
        {"part": "packing", "grade_id": "p2_tests", "points": 2, "library": ["quant.pack_int4", "quant.unpack_int4"],
         "asks": ["pack_int4", "unpack_int4"],
         "hides": ["quant.pack_int4", "quant.unpack_int4"]},
        {"part": "q4_1", "grade_id": "p3_tests", "points": 2, "library": ["checkpoints.dequantize_q4_1"],
         "asks": ["dequantize_q4_1"],
         # Q4_0's decoder and the nibble helper they share give Q4_1's codes in GGUF's order
         "hides": ["checkpoints.dequantize_q4_1", "checkpoints.dequantize_q4_0", "checkpoints._nibbles"]},
        {"part": "quant_linear", "grade_id": "p4_tests", "points": 3,
         "library": ["quant.QuantLinear.from_linear", "quant.QuantLinear.dequantized_weight", "quant.QuantLinear.forward"],
         "asks": ["QuantLinear"],
         "hides": ["quant.QuantLinear", "quant.quantize_model", "kernels.quant_matmul"]},
        {"part": "performance", "grade_id": "p5_tests", "points": 2, "library": [],
         "asks": ["model_bytes", "QuantLinear"],
         "hides": [], "timed": True},
    ],
}

BY_NOTEBOOK = {spec["notebook"]: lab for lab, spec in PARTS.items()}

# Imported in the sandbox before any ban and before the student's code: the library as a notebook's
# first cell would import it.
PRELOAD = ["effml_lib", "effml_lib.model", "effml_lib.checkpoints", "effml_lib.decoding"]


def lab_of(notebook: str) -> str:
    """"lab01_transformer_basics" -> "lab01"."""
    if notebook not in BY_NOTEBOOK:
        raise KeyError(f"no lab {notebook!r} in grading/parts.py; the labs are {', '.join(sorted(BY_NOTEBOOK))}")
    return BY_NOTEBOOK[notebook]


def library_names(lab: str) -> list[str]:
    """Every library name the lab's parts hide (the sandbox lacks all of them for the whole lab)."""
    names = []
    for part in PARTS[lab]["parts"]:
        names += [n for n in part["hides"] if n not in names]
    return names


def preload(lab: str) -> list[str]:
    return list(PRELOAD)


def part_of(lab: str, grade_id: str) -> dict:
    return next(p for p in PARTS[lab]["parts"] if p["grade_id"] == grade_id)
