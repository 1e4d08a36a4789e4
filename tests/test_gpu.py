"""The same answers on a real GPU (run through the device tool; skipped without CUDA)."""

import pytest
import torch

from effml_lib.attention import attention
from effml_lib.decoding import generate
from conftest import assert_close
from test_model import small_model

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("tq,tk", [(64, 64), (1, 300), (5, 77)])
def test_cuda_attention_matches_cpu_reference(dtype, tq, tk, gen):
    q = torch.randn(2, 8, tq, 64, generator=gen)
    k = torch.randn(2, 2, tk, 64, generator=gen)
    v = torch.randn(2, 2, tk, 64, generator=gen)
    expected = attention(q.double(), k.double(), v.double(), impl="torch")
    for impl in ("torch", "sdpa", "auto"):
        got = attention(q.to("cuda", dtype), k.to("cuda", dtype), v.to("cuda", dtype), impl=impl)
        assert_close(got.cpu(), expected, dtype, what=f"cuda attention impl={impl}")


def test_cuda_model_matches_cpu(gen):
    model = small_model()
    tokens = torch.randint(0, 97, (2, 40), generator=gen)
    with torch.no_grad():
        expected = model(tokens)
        got = model.to("cuda")(tokens.cuda()).cpu()
    # TF32 matmuls are off by default for float32 in PyTorch, so float32 tolerances apply
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


def test_cuda_compiled_decode_equals_eager(gen):
    model = small_model().cuda()
    prompt = torch.randint(0, 97, (2, 6), generator=gen).cuda()
    eager = generate(model, prompt, 30)
    assert torch.equal(generate(model, prompt, 30, compile=True), eager)
    assert torch.equal(generate(model, prompt, 30, compile=True), eager), "second (graph replay) call differs"


def test_cuda_load_hf_matches_transformers(tmp_path, gen):
    pytest.importorskip("transformers")
    from effml_lib.checkpoints import load_hf
    from test_checkpoints import SIZES, save_random_hf_model

    hf = save_random_hf_model("qwen2-gqa-bias-tied", tmp_path).cuda()
    ours = load_hf(tmp_path, device="cuda")
    tokens = torch.randint(0, SIZES["vocab_size"], (2, 33), generator=gen).cuda()
    with torch.no_grad():
        diff = (ours(tokens) - hf(tokens).logits).abs().max().item()
    assert diff <= 1e-4, f"max |logits difference| on CUDA {diff:.2e}"


RAGGED = [[5, 17, 90, 3, 12, 40, 8], [60, 14], [7, 7, 7, 7], [33]]


def test_cuda_ragged_batch_eager_and_compiled_equal_each_prompt_alone_on_cpu():
    """On CUDA a decode step's attention is the Triton kernel (eager: called directly; compiled: the
    custom op inside the CUDA graph); each sequence's greedy tokens equal the CPU's for it alone."""
    from effml_lib import attention as attention_module

    model = small_model(dim=64, n_heads=4, n_kv_heads=2)  # head_dim 16: the kernel applies
    q, k = torch.zeros(4, 4, 1, 16, device="cuda"), torch.zeros(4, 2, 8, 16, device="cuda")
    assert attention_module._pick_decode_impl(q, k) == "triton", "auto must pick the kernel for a decode step on CUDA"
    alone = [generate(model, prompt, 20)[0] for prompt in RAGGED]
    model = model.cuda()
    eager = generate(model, RAGGED, 20)
    compiled = generate(model, RAGGED, 20, compile=True)
    for prompt, want, got_eager, got_compiled in zip(RAGGED, alone, eager, compiled):
        assert torch.equal(got_eager.cpu(), want), f"eager CUDA, prompt of {len(prompt)}: {got_eager.tolist()} != {want.tolist()}"
        assert torch.equal(got_compiled.cpu(), want), f"compiled CUDA, prompt of {len(prompt)}"


def test_cuda_cached_logits_through_the_kernel_match_the_cpu_reference(gen):
    from effml_lib.kvcache import StaticKVCache

    model = small_model(dim=64, n_heads=4, n_kv_heads=2)
    tokens = torch.randint(0, 97, (2, 24), generator=gen)
    with torch.no_grad():
        expected = model(tokens)[:, 16:]
        model = model.cuda()
        cache = StaticKVCache.for_model(model, batch_size=2, max_seq_len=32)
        model(tokens[:, :16].cuda(), cache, 0)
        steps = [model(tokens[:, t : t + 1].cuda(), cache, t) for t in range(16, 24)]
    torch.testing.assert_close(torch.cat(steps, 1).cpu(), expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("form", ["zero point", "offset"])
def test_cuda_compiled_decode_of_a_quantized_model_equals_its_reference(form, gen):
    """QuantLinear's custom operator on CUDA, in both 4-bit forms (integer zero points; float16 offsets,
    GGUF's Q4_1): the logits of the CPU's PyTorch reference, and inside torch.compile and CUDA graphs the
    tokens of the eager kernel."""
    from effml_lib.quant import QuantLinear, quantize_model

    model = quantize_model(small_model(), 4, 32, impl="torch")
    if form == "offset":
        for m in model.modules():
            if isinstance(m, QuantLinear):  # the same codes and scales, w = code * scale + offset
                offset = -(m.zero.float() * m.scale.float()).half()
                m.register_buffer("zero", None)
                m.register_buffer("offset", offset)
    prompt = torch.randint(0, 97, (1, 12), generator=gen)
    with torch.no_grad():
        expected_logits = model(prompt)  # CPU, the reference path
    model = model.cuda()
    for m in model.modules():
        if isinstance(m, QuantLinear):
            m.impl = "triton"
    with torch.no_grad():
        torch.testing.assert_close(model(prompt.cuda()).cpu(), expected_logits, atol=1e-4, rtol=1e-4)
    eager = generate(model, prompt.cuda(), 16)
    assert torch.equal(generate(model, prompt.cuda(), 16, compile=True), eager), f"{form}: compiled decode differs from eager"
