"""Held-out loss vs position past the trained context, with and without RoPE scaling and fine-tuning.

    python bench/rope_context.py --data-dir .traindata          # GPU: about a minute on an H100
    python bench/rope_context.py --data-dir .traindata --steps 0 # no fine-tuning (runs on a CPU too)

effml-tiny was trained on 512-token windows. Here it reads 2048-token windows of held-out code
(each inside one file, so every position has real context behind it) and we record the loss at
every position, for:

  trained            the model as shipped: positions past 512 give rotation angles it never saw
  linear x4 (PI)     position interpolation: positions divided by 4, so 2048 maps onto 0..512
  NTK x4             NTK-aware scaling: the base theta raised so low frequencies stretch ~4x
  ... + fine-tune    each of the three, fine-tuned for --steps steps on 2048-token training windows

Notebook 02 plots this file (the fine-tuned curves need a GPU to make in reasonable time) next to
the three un-tuned curves it measures live on the reader's machine.
Results: bench/results/<device>/rope_context.json.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from effml_lib.checkpoints import pretrained  # noqa: E402
from effml_lib.device import get_device  # noqa: E402
from effml_lib.measure import device_slug, save_result  # noqa: E402
from effml_lib.tokenizer import load_tokenizer  # noqa: E402
from effml_lib.train import continue_training, load_split_tokens  # noqa: E402

TRAINED_CONTEXT = 512
VARIANTS = {  # name -> rope scaling
    "trained": None,
    "linear x4 (PI)": {"type": "linear", "factor": 4},
    "NTK x4": {"type": "ntk", "factor": 4},
}


def document_windows(tokens: torch.Tensor, eot_id: int, seq_len: int) -> torch.Tensor:
    """Non-overlapping (seq_len + 1)-token windows that lie inside one document: (N, seq_len + 1)."""
    ends = (tokens == eot_id).nonzero().flatten().tolist()
    windows, start = [], 0
    for end in ends:  # the document is tokens[start:end]
        for s in range(start, end - seq_len, seq_len):
            windows.append(tokens[s : s + seq_len + 1])
        start = end + 1
    return torch.stack(windows)


@torch.no_grad()
def loss_by_position(model, windows: torch.Tensor, batch_size: int, device, autocast) -> torch.Tensor:
    """Mean next-token loss (nats) at each position over all windows: (seq_len,)."""
    model.eval()
    total = torch.zeros(windows.shape[1] - 1, dtype=torch.float64)
    for i in range(0, len(windows), batch_size):
        batch = windows[i : i + batch_size].to(device)
        x, y = batch[:, :-1], batch[:, 1:]  # (B, T)
        with autocast():
            logits = model(x)
        loss = F.cross_entropy(logits.float().transpose(1, 2), y, reduction="none")  # (B, T)
        total += loss.sum(0).double().cpu()
    return total / len(windows)


def fine_tune(model, train_tokens, args, device, autocast) -> list[float]:
    """A short fine-tune at the long context; returns the training loss every 10 steps."""
    return continue_training(model, train_tokens, args.steps, args.batch_size, args.seq_len, args.lr, device, autocast)


def summarize(curve: torch.Tensor) -> dict:
    return {"loss_within_trained_context": curve[:TRAINED_CONTEXT].mean().item(),
            "loss_beyond_trained_context": curve[TRAINED_CONTEXT:].mean().item(),
            "loss_by_position": [round(v, 5) for v in curve.tolist()]}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data-dir", default=None, help="token files from `python -m effml_lib.train --prepare-only`")
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--steps", type=int, default=300, help="fine-tuning steps per variant (0: none)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--max-windows", type=int, default=None, help="evaluate on fewer held-out windows")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)

    device = get_device()
    use_bf16 = device.type == "cuda"

    def autocast():
        if not use_bf16:
            return contextlib.nullcontext()
        return torch.autocast(device_type="cuda", dtype=torch.bfloat16)

    eot = load_tokenizer().eot_id
    windows = document_windows(load_split_tokens("heldout", args.data_dir), eot, args.seq_len)[: args.max_windows]
    train_tokens = load_split_tokens("train", args.data_dir).to(device) if args.steps else None
    print(f"{len(windows)} held-out windows of {args.seq_len} tokens on {device}")

    base = pretrained("effml-tiny", device=device)
    results = {}
    for name, scaling in VARIANTS.items():
        model = copy.deepcopy(base).set_rope(scaling=scaling, max_seq_len=args.seq_len)
        start = time.perf_counter()
        results[name] = summarize(loss_by_position(model, windows, args.batch_size, device, autocast))
        results[name].update(scaling=scaling, fine_tune_steps=0, seconds=time.perf_counter() - start)
        if args.steps:
            start = time.perf_counter()
            train_losses = fine_tune(model, train_tokens, args, device, autocast)
            tuned = summarize(loss_by_position(model, windows, args.batch_size, device, autocast))
            tuned.update(scaling=scaling, fine_tune_steps=args.steps, train_loss_every_10_steps=train_losses,
                         seconds=time.perf_counter() - start)
            results[f"{name} + fine-tune"] = tuned
    for name, r in results.items():
        print(f"{name:32s} loss within 512: {r['loss_within_trained_context']:.3f}   "
              f"beyond: {r['loss_beyond_trained_context']:.3f}")

    meta = json.loads((Path(args.data_dir) / "meta.json").read_text()) if args.data_dir else None
    payload = {"model": "effml-tiny", "trained_context": TRAINED_CONTEXT, "seq_len": args.seq_len,
               "heldout_windows": len(windows), "fine_tune": {"steps": args.steps, "batch_size": args.batch_size,
               "lr": args.lr, "tokens": args.steps * args.batch_size * args.seq_len,
               "fraction_of_pretraining_tokens": args.steps * args.batch_size * args.seq_len / (5000 * 32 * 512)},
               "corpus": meta, "variants": results}
    out = Path(args.out) if args.out else ROOT / "bench" / "results" / device_slug(device) / "rope_context.json"
    print("wrote", save_result(out, payload, device=device))
    return payload


if __name__ == "__main__":
    main()
