import math

import pytest
import torch

from effml_lib.rope import apply_rope, apply_rope_qk, permute_qk_weight, rope_frequencies


def complex_rope(x, positions, theta=10000.0, interleaved=False):
    """Independent reference: pairs as complex numbers multiplied by e^{i * pos * freq}, in float64."""
    d = x.shape[-1]
    freqs = theta ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)  # (D/2,)
    angles = positions.double()[..., None] * freqs  # (..., T, D/2)
    xd = x.double()
    if interleaved:
        z = torch.complex(xd[..., 0::2], xd[..., 1::2])
    else:
        z = torch.complex(xd[..., : d // 2], xd[..., d // 2 :])
    z = z * torch.polar(torch.ones_like(angles), angles)
    if interleaved:
        return torch.stack((z.real, z.imag), dim=-1).flatten(-2)
    return torch.cat((z.real, z.imag), dim=-1)


@pytest.mark.parametrize("interleaved", [False, True])
def test_matches_complex_multiplication(interleaved, gen):
    x = torch.randn(2, 3, 10, 16, generator=gen)
    cos, sin = rope_frequencies(16, 64)
    got = apply_rope(x, cos, sin, interleaved=interleaved)
    torch.testing.assert_close(got.double(), complex_rope(x, torch.arange(10), interleaved=interleaved), atol=1e-5, rtol=1e-5)


def test_arbitrary_positions_per_batch(gen):
    x = torch.randn(2, 2, 3, 8, generator=gen)
    positions = torch.tensor([[5, 9, 40], [0, 1, 63]])
    cos, sin = rope_frequencies(8, 64)
    got = apply_rope(x, cos, sin, positions=positions)
    expected = torch.stack([complex_rope(x[b], positions[b]) for b in range(2)])
    torch.testing.assert_close(got.double(), expected, atol=1e-5, rtol=1e-5)


def test_scores_depend_only_on_relative_position(gen):
    q = torch.randn(1, 1, 1, 32, generator=gen)
    k = torch.randn(1, 1, 1, 32, generator=gen)
    cos, sin = rope_frequencies(32, 256)
    def score(m, n):
        qm = apply_rope(q, cos, sin, positions=torch.tensor([m]))
        kn = apply_rope(k, cos, sin, positions=torch.tensor([n]))
        return (qm * kn).sum().item()
    assert score(7, 3) == pytest.approx(score(107, 103), abs=1e-4)
    assert score(7, 3) != pytest.approx(score(7, 4), abs=1e-3)


def test_scaling_variants():
    cos, _ = rope_frequencies(8, 32, scaling={"type": "linear", "factor": 4})
    cos_ref, _ = rope_frequencies(8, 32)
    torch.testing.assert_close(cos[8], cos_ref[2])  # position 8 interpolated to 2
    # NTK-aware scaling: the fastest rotation is untouched, the slowest one turns exactly `factor` times slower
    cos_ntk, sin_ntk = rope_frequencies(8, 32, theta=10000.0, scaling={"type": "ntk", "factor": 4})
    cos_ref, sin_ref = rope_frequencies(8, 32, theta=10000.0)
    angle_ntk = torch.atan2(sin_ntk[1], cos_ntk[1])  # radians per position, one per pair
    angle_ref = torch.atan2(sin_ref[1], cos_ref[1])
    torch.testing.assert_close(angle_ntk[0], angle_ref[0])
    torch.testing.assert_close(angle_ntk[-1], angle_ref[-1] / 4)
    assert (angle_ntk[1:-1] < angle_ref[1:-1]).all()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_inputs_rotate_in_float32(dtype, gen):
    x = torch.randn(1, 2, 5, 16, generator=gen).to(dtype)
    cos, sin = rope_frequencies(16, 8)
    got = apply_rope(x, cos, sin)
    assert got.dtype == dtype
    expected = complex_rope(x.float(), torch.arange(5)).to(dtype)
    torch.testing.assert_close(got, expected, atol=1e-2, rtol=1e-2)


def test_bad_inputs():
    with pytest.raises(ValueError, match="head_dim"):
        rope_frequencies(7, 10)
    cos, sin = rope_frequencies(8, 4)
    with pytest.raises(ValueError, match="exceeds"):
        apply_rope(torch.randn(1, 1, 5, 8), cos, sin)
    with pytest.raises(ValueError, match="cos and sin"):
        apply_rope(torch.randn(1, 1, 2, 16), cos, sin)
    with pytest.raises(TypeError, match="positions"):
        apply_rope(torch.randn(1, 1, 2, 8), cos, sin, positions=torch.tensor([0.0, 1.0]))
    with pytest.raises(ValueError, match="scaling"):
        rope_frequencies(8, 4, scaling={"type": "yarn", "factor": 2})
    with pytest.raises(TypeError, match="scaling must be a dict"):
        rope_frequencies(8, 4, scaling="linear")
    with pytest.raises(ValueError, match="head_dim > 2"):
        rope_frequencies(2, 4, scaling={"type": "ntk", "factor": 2})
    with pytest.raises(TypeError, match="floating-point"):
        apply_rope(torch.ones(1, 1, 2, 8, dtype=torch.long), cos, sin)
    with pytest.raises(ValueError, match="batch size"):
        apply_rope(torch.randn(2, 1, 2, 8), cos, sin, positions=torch.zeros(3, 2, dtype=torch.long))
    with pytest.raises(ValueError, match=r"positions must lie in \[0, 4\)"):
        apply_rope(torch.randn(1, 1, 2, 8), cos, sin, positions=torch.tensor([3, 4]))
    with pytest.raises(ValueError, match="positions must lie"):
        apply_rope(torch.randn(1, 1, 1, 8), cos, sin, positions=torch.tensor([-1]))
    with pytest.raises(ValueError, match="must agree on B, T and D"):
        apply_rope_qk(torch.randn(1, 2, 2, 8), torch.randn(1, 1, 3, 8), cos, sin)
    with pytest.raises(ValueError, match="impl"):
        apply_rope(torch.randn(1, 1, 2, 8), cos, sin, impl="cuda")
    with pytest.raises(ValueError, match="n_heads"):
        permute_qk_weight(torch.randn(12, 4), n_heads=5)
    with pytest.raises(ValueError, match="to must be"):
        permute_qk_weight(torch.randn(12, 4), n_heads=2, to="llama")


def test_qk_together_equals_one_at_a_time(gen):
    q, k = torch.randn(2, 4, 5, 16, generator=gen), torch.randn(2, 2, 5, 16, generator=gen)
    cos, sin = rope_frequencies(16, 32)
    positions = torch.tensor([[0, 3, 9, 10, 31], [1, 2, 3, 4, 5]])
    q_rot, k_rot = apply_rope_qk(q, k, cos, sin, positions)
    assert torch.equal(q_rot, apply_rope(q, cos, sin, positions))
    assert torch.equal(k_rot, apply_rope(k, cos, sin, positions))


def hf_style_permute(w, n_heads):
    """The well-known converter recipe, as an independent reference: split each head's rows into
    (D/2, 2) pairs and transpose to (2, D/2), so pair members land D/2 apart."""
    rows, cols = w.shape
    return w.view(n_heads, rows // n_heads // 2, 2, cols).transpose(1, 2).reshape(rows, cols)


@pytest.mark.parametrize("n_heads,n_kv_heads", [(4, 4), (4, 2), (4, 1)])
def test_permuted_projections_give_equal_attention_scores(n_heads, n_kv_heads, gen):
    dim, head_dim, t = 24, 8, 7
    wq = torch.randn(n_heads * head_dim, dim, generator=gen, dtype=torch.float64)
    wk = torch.randn(n_kv_heads * head_dim, dim, generator=gen, dtype=torch.float64)
    x = torch.randn(1, t, dim, generator=gen, dtype=torch.float64)
    cos, sin = rope_frequencies(head_dim, 64)
    positions = torch.tensor([0, 1, 5, 6, 20, 21, 63])

    def scores(wq, wk, interleaved):
        q = (x @ wq.T).view(1, t, n_heads, head_dim).transpose(1, 2)
        k = (x @ wk.T).view(1, t, n_kv_heads, head_dim).transpose(1, 2)
        q, k = apply_rope_qk(q, k, cos, sin, positions, interleaved=interleaved)
        k = k.repeat_interleave(n_heads // n_kv_heads, dim=1)
        return q @ k.transpose(-2, -1)  # (1, H, T, T)

    meta = scores(wq, wk, interleaved=True)  # a checkpoint written for the paper's pairing
    wq_hf, wk_hf = permute_qk_weight(wq, n_heads), permute_qk_weight(wk, n_kv_heads)
    torch.testing.assert_close(wq_hf, hf_style_permute(wq, n_heads), atol=0, rtol=0)
    torch.testing.assert_close(scores(wq_hf, wk_hf, interleaved=False), meta, atol=1e-10, rtol=1e-10)
    # ...and the permutation is not a no-op: the wrong pairing changes the scores
    assert not torch.allclose(scores(wq, wk, interleaved=False), meta, atol=1e-3)
    # back again, and biases (1-D) too
    assert torch.equal(permute_qk_weight(wq_hf, n_heads, to="interleaved"), wq)
    bias = torch.arange(n_heads * head_dim, dtype=torch.float64)
    assert torch.equal(permute_qk_weight(bias[:, None], n_heads).squeeze(1), permute_qk_weight(bias, n_heads))
