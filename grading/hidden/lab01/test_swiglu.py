"""Lab 01, part 3: swiglu(x, w1, w2, w3) = (silu(x w1^T) * (x w3^T)) w2^T, weights as in nn.Linear."""

import pytest
import torch



def reference(x, w1, w2, w3):
    x, w1, w2, w3 = (t.double() for t in (x, w1, w2, w3))
    gate = x @ w1.T
    return (gate * torch.sigmoid(gate) * (x @ w3.T)) @ w2.T


@pytest.mark.parametrize("dim,hidden", [(8, 16), (384, 1024)])
def test_matches_the_formula(student, gen, close, dim, hidden):
    x = torch.randn(2, 5, dim, generator=gen)
    w1, w3 = (torch.randn(hidden, dim, generator=gen) / dim**0.5 for _ in range(2))
    w2 = torch.randn(dim, hidden, generator=gen) / hidden**0.5
    out = student.swiglu(x, w1, w2, w3)
    assert close(out, reference(x, w1, w2, w3), 1e-5, 1e-4), f"wrong output for dim={dim}, hidden={hidden}"


def test_gate_and_up_are_not_swapped(student, gen, close):
    x = torch.randn(3, 8, generator=gen)
    w1, w3 = torch.randn(16, 8, generator=gen), torch.randn(16, 8, generator=gen)
    w2 = torch.randn(8, 16, generator=gen)
    out = student.swiglu(x, w1, w2, w3)
    assert not close(out, reference(x, w3, w2, w1), 1e-5, 1e-4), "silu is applied to x w3^T: it belongs on the gate, x w1^T"
    assert close(out, reference(x, w1, w2, w3), 1e-5, 1e-4), "wrong output"
