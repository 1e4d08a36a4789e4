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
