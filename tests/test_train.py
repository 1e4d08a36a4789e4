"""The training script end to end on a tiny preset, and its schedule."""

import json
import math

import pytest
import torch

from effml_lib import checkpoints
from effml_lib.train import evaluate, lr_at, main


@pytest.fixture
def token_dir(tmp_path):
    # A learnable synthetic corpus: a repeating pattern with a little noise, as the two splits.
    g = torch.Generator().manual_seed(0)
    pattern = torch.arange(0, 4000, 37) % 4095
    def corpus(n):
        t = pattern.repeat(n // len(pattern) + 1)[:n].clone()
        noise = torch.rand(n, generator=g) < 0.05
        t[noise] = torch.randint(0, 4095, (int(noise.sum()),), generator=g)
        return t.to(torch.int16)
    torch.save(corpus(20_000), tmp_path / "train.pt")
    torch.save(corpus(3_000), tmp_path / "heldout.pt")
    (tmp_path / "meta.json").write_text(json.dumps({"python": "synthetic"}))
    return tmp_path


def test_training_learns_and_writes_a_loadable_checkpoint(token_dir, tmp_path):
    out = tmp_path / "run"
    main(["--preset", "test", "--steps", "60", "--batch-size", "8", "--seq-len", "64", "--lr", "3e-3",
          "--warmup", "5", "--eval-every", "20", "--log-every", "10", "--data-dir", str(token_dir),
          "--out", str(out), "--device", "cpu"])
    info = json.loads((out / "config.json").read_text())["training"]
    assert info["heldout_loss"] < math.log(4096) - 2, "60 steps on a repeating pattern must beat uniform by far"
    assert info["command"].startswith("python -m effml_lib.train --preset test")
    assert (out / "loss.png").stat().st_size > 0 and (out / "log.csv").read_text().startswith("step,")
    model = checkpoints.load(out)
    heldout = torch.load(token_dir / "heldout.pt").long()
    # the saved fp16 weights reproduce the recorded held-out loss
    assert evaluate(model, heldout, 64, 8, "cpu") == pytest.approx(info["heldout_loss"], rel=1e-3)


def test_lr_schedule_warms_up_then_decays_to_ten_percent():
    assert lr_at(0, 1.0, 10, 100) == pytest.approx(0.1)
    assert lr_at(9, 1.0, 10, 100) == pytest.approx(1.0)
    assert lr_at(10, 1.0, 10, 100) == pytest.approx(1.0)
    assert lr_at(55, 1.0, 10, 100) == pytest.approx(0.55)
    assert lr_at(100, 1.0, 10, 100) == pytest.approx(0.1)


def test_bad_arguments(tmp_path):
    with pytest.raises(SystemExit):
        main(["--steps", "0"])
    with pytest.raises(FileNotFoundError, match="train.pt"):
        main(["--preset", "test", "--steps", "1", "--data-dir", str(tmp_path), "--out", str(tmp_path / "x")])


def test_continue_training_lowers_the_loss_and_leaves_eval_mode():
    from effml_lib.model import ModelConfig, Transformer
    from effml_lib.train import continue_training

    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=16, dim=32, n_layers=1, n_heads=2, hidden_dim=64, max_seq_len=32))
    tokens = torch.arange(16).repeat(200)  # a cycle: next token = current + 1 (mod 16)
    losses = continue_training(model, tokens, steps=60, batch_size=8, seq_len=16, lr=3e-3, device="cpu")
    assert len(losses) == 7, "a loss every 10 steps, and the last step's"
    assert losses[-1] < 0.5 * losses[0], f"60 steps on a 16-token cycle should halve the loss: {losses}"
    assert not model.training
