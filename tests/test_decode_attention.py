"""Decode attention (a few queries against a partly filled KV cache): the reference against a slow
per-sequence loop, and the split-K Triton kernel against the reference (under TRITON_INTERPRET=1
without a GPU, on CUDA on the GPU machine)."""

import math
import platform

import pytest
import torch

from conftest import assert_close
from effml_lib.attention import decode_attention

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def slow_decode_attention(q, k, v, context_lens):
    """One sequence, one query head at a time, in float64, straight from the definition."""
    b, h, tq, d = q.shape
    group = h // k.shape[1]
    out = torch.zeros(b, h, tq, d, dtype=torch.float64)
    for bi in range(b):
        n = int(context_lens[bi])
        for hi in range(h):
            keys, values = k[bi, hi // group, :n].double(), v[bi, hi // group, :n].double()  # (n, D)
            for i in range(tq):
                position = n - tq + i  # this query's place in the sequence
                scores = keys[: position + 1] @ q[bi, hi, i].double() / math.sqrt(d)
                out[bi, hi, i] = torch.softmax(scores, 0) @ values[: position + 1]
    return out


def make(b, h, h_kv, tq, s, d, dtype, gen, device="cpu"):
    q = torch.randn(b, h, tq, d, generator=gen)
    k, v = torch.randn(b, h_kv, s, d, generator=gen), torch.randn(b, h_kv, s, d, generator=gen)
    return (t.to(device, dtype) for t in (q, k, v))


@pytest.mark.parametrize("h,h_kv,tq", [(4, 4, 1), (8, 2, 1), (6, 1, 3)], ids=["mha", "gqa", "mqa_3_queries"])
def test_reference_matches_the_definition(h, h_kv, tq, gen):
    q, k, v = make(3, h, h_kv, tq, 40, 16, torch.float32, gen)
    context_lens = torch.tensor([40, 3, 17])
    got = decode_attention(q, k, v, context_lens, impl="torch")
    assert_close(got, slow_decode_attention(q, k, v, context_lens), torch.float32, what="decode attention reference")


def test_bad_context_lengths(gen):
    q, k, v = make(2, 4, 2, 2, 10, 16, torch.float32, gen)
    with pytest.raises(ValueError, match="context_lens must lie"):
        decode_attention(q, k, v, torch.tensor([10, 1]))  # 1 < Tq: the new tokens must be in the cache
    with pytest.raises(ValueError, match="context_lens must lie"):
        decode_attention(q, k, v, torch.tensor([11, 5]))
    with pytest.raises(TypeError, match="context_lens"):
        decode_attention(q, k, v, torch.tensor([5.0, 5.0]))


kernel = pytest.mark.skipif(
    (platform.system(), platform.machine()) != ("Linux", "x86_64") and not torch.cuda.is_available(),
    reason="Triton is a dev dependency on x86-64 Linux only")


@kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("h,h_kv,tq,d", [(4, 4, 1, 16), (8, 2, 1, 32), (6, 1, 3, 24), (4, 2, 2, 64)],
                         ids=["mha", "gqa", "mqa_3_queries_d24", "gqa_2_queries_d64"])
def test_kernel_matches_reference(dtype, h, h_kv, tq, d, gen):
    q, k, v = make(3, h, h_kv, tq, 70, d, dtype, gen, DEVICE)
    context_lens = torch.tensor([70, tq, 33], device=DEVICE)  # full, only the new tokens, part-filled
    expected = decode_attention(q, k, v, context_lens, impl="torch")
    from effml_lib.kernels.decode_attention import decode_attention_triton

    for n_splits in (1, 3, None):  # one chunk, several (some empty for the short sequences), automatic
        got = decode_attention_triton(q, k, v, context_lens.int(), n_splits=n_splits)
        assert got.dtype == dtype
        assert_close(got, expected, what=f"kernel with n_splits={n_splits}")


@kernel
def test_kernel_merges_more_chunks_than_one_combine_block(gen):
    """70 chunks of 16 keys: the combine step merges them 32 at a time (three blocks, the last partial)."""
    from effml_lib.kernels.decode_attention import decode_attention_triton

    q, k, v = make(2, 4, 2, 1, 70 * 16, 16, torch.float32, gen, DEVICE)
    context_lens = torch.tensor([70 * 16, 500], device=DEVICE)
    got = decode_attention_triton(q, k, v, context_lens.int(), n_splits=70, block_n=16)
    assert_close(got, decode_attention(q, k, v, context_lens, impl="torch"), what="70 chunks")


@kernel
def test_kernel_reads_strided_caches_and_public_entry_point(gen):
    q, k, v = make(2, 4, 2, 1, 50, 32, torch.float32, gen, DEVICE)
    k_strided = k.transpose(1, 2).contiguous().transpose(1, 2)  # (B, Hkv, S, D) view of (B, S, Hkv, D)
    got = decode_attention(q, k_strided, v, torch.tensor([50, 9], device=DEVICE), impl="triton")
    assert_close(got, decode_attention(q, k, v, torch.tensor([50, 9], device=DEVICE), impl="torch"), what="strided k")
    with pytest.raises(ValueError, match="head_dim >= 16"):
        decode_attention(*make(1, 2, 2, 1, 8, 8, torch.float32, gen, DEVICE), impl="triton")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("batch,context", [(1, 32768), (16, 4096), (4, 1000)])
def test_gpu_long_contexts(dtype, batch, context, gen):
    q, k, v = make(batch, 32, 8, 1, context, 128, dtype, gen, DEVICE)
    context_lens = torch.randint(1, context + 1, (batch,), generator=gen).to(DEVICE)
    context_lens[0] = context
    got = decode_attention(q, k, v, context_lens, impl="triton")
    expected = decode_attention(q.double(), k.double(), v.double(), context_lens, impl="torch")
    assert_close(got, expected, dtype, what=f"kernel at B={batch}, context {context}")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("head_dim,q_len", [(64, 1), (256, 1), (128, 4)])
def test_gpu_tile_sizes_fit_shared_memory(dtype, head_dim, q_len, gen):
    """The default key tile shrinks where 3 buffered K/V tiles would not fit (fp32, head_dim 256)."""
    q, k, v = make(2, 32, 8, q_len, 5000, head_dim, dtype, gen, DEVICE)
    context_lens = torch.tensor([5000, 1234], device=DEVICE)
    got = decode_attention(q, k, v, context_lens, impl="triton")
    expected = decode_attention(q.double(), k.double(), v.double(), context_lens, impl="torch")
    assert_close(got, expected, dtype, what=f"kernel at head_dim {head_dim}, {q_len} queries")


@pytest.mark.parametrize("h,h_kv,tq", [(4, 4, 1), (8, 2, 3)], ids=["mha", "gqa_3_queries"])
def test_sdpa_impl_matches_reference(h, h_kv, tq, gen):
    q, k, v = make(3, h, h_kv, tq, 40, 16, torch.float32, gen)
    context_lens = torch.tensor([40, tq, 17])
    assert_close(decode_attention(q, k, v, context_lens, impl="sdpa"),
                 slow_decode_attention(q, k, v, context_lens), torch.float32, what="decode attention through SDPA")


class TritonDecodeCache:
    """The static cache, its attention forced onto the Triton kernel (the interpreter on a CPU)."""

    def __new__(cls, *args, **kwargs):
        from effml_lib.kvcache import StaticKVCache

        class _Cache(StaticKVCache):
            def attention(self, q, keys, values, context_lens, impl="auto"):
                return super().attention(q, keys, values, context_lens, "triton")

        return _Cache.for_model(*args, **kwargs)


@kernel
def test_model_decodes_a_ragged_batch_through_the_kernel(gen):
    """Prefill and per-sequence decode steps of the model, attention by the Triton kernel (through
    the custom operator the compiled decode step uses), equal the model's own logits of each sequence."""
    from test_model import small_model

    model = small_model(dim=64, n_heads=4, n_kv_heads=2).to(DEVICE)  # head_dim 16, the kernel's minimum
    long, short = (torch.randint(0, 97, (1, n), generator=gen).to(DEVICE) for n in (9, 6))
    cache = TritonDecodeCache(model, batch_size=2, max_seq_len=12)
    with torch.no_grad():
        # right-padded prefill (sequence 1's real tokens are its first 5), then one step each at its own position
        padded = torch.cat([long[:, :8], torch.cat([short[:, :5], torch.zeros(1, 3, dtype=torch.long, device=DEVICE)], 1)])
        model(padded, cache, 0)
        token = torch.stack([long[0, 8], short[0, 5]])[:, None]
        step = model(token, cache, torch.tensor([8, 5], device=DEVICE))[:, 0]  # (2, V)
        assert_close(step[0], model(long)[0, 8], what="sequence 0's step through the kernel")
        assert_close(step[1], model(short)[0, 5], what="sequence 1's step through the kernel")
