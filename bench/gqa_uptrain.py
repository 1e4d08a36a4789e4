"""The GQA paper's experiment at course scale: mean-pool effml-tiny's K/V heads, then uptrain briefly.

    python bench/gqa_uptrain.py --data-dir .traindata             # GPU: about two minutes on an H100
    python bench/gqa_uptrain.py --steps 0 --eval-batches 4        # conversion only (runs on a CPU)

effml-tiny has 6 attention heads (multi-head: 6 KV heads). For 3, 2 and 1 KV heads (the divisors of 6
below it; 4 does not divide 6) we record the held-out loss:

  converted     right after ``mha_to_gqa`` (each group's K and V projections averaged)
  uptrained     after ``--steps`` more training steps of the converted model (the paper used 5% of
                pre-training; 250 steps x 32 x 512 tokens is 5% of effml-tiny's 5000 steps)
  from scratch  a model of the same shape trained from random weights for the same ``--steps``

and, as the control, the original MHA model given the same extra training. Each variant's KV-cache
bytes per token go beside its loss, for notebook 04's plot of quality against cache size.
Results: bench/results/<device>/gqa_uptrain.json.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from effml_lib.attention import mha_to_gqa  # noqa: E402
from effml_lib.checkpoints import pretrained  # noqa: E402
from effml_lib.device import get_device  # noqa: E402
from effml_lib.kvcache import kv_cache_bytes  # noqa: E402
from effml_lib.measure import device_slug, save_result  # noqa: E402
from effml_lib.model import Transformer  # noqa: E402
from effml_lib.train import continue_training, evaluate, load_split_tokens  # noqa: E402

PRETRAINING_STEPS = 5000  # effml-tiny's training run: 5000 steps x 32 x 512 tokens (its config.json)


def cache_bytes_per_token(config) -> int:
    return kv_cache_bytes(1, 1, config.n_layers, config.n_kv_heads, config.head_dim, 2)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data-dir", default=None, help="token files from `python -m effml_lib.train --prepare-only`")
    parser.add_argument("--kv-heads", type=int, nargs="+", default=[3, 2, 1])
    parser.add_argument("--steps", type=int, default=250, help="uptraining (and from-scratch) steps; 0: none")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--lr", type=float, default=3e-4, help="peak learning rate of uptraining")
    parser.add_argument("--scratch-lr", type=float, default=1.5e-3, help="peak learning rate from scratch (pre-training's)")
    parser.add_argument("--eval-batches", type=int, default=None, help="held-out batches of 32 x 512 (default: all)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)

    device = get_device()
    use_bf16 = device.type == "cuda"

    def autocast():
        return torch.autocast(device_type="cuda", dtype=torch.bfloat16) if use_bf16 else contextlib.nullcontext()

    heldout = load_split_tokens("heldout", args.data_dir)
    train_tokens = load_split_tokens("train", args.data_dir).to(device) if args.steps else None

    def loss_of(model):
        return evaluate(model, heldout, args.seq_len, 32, device, args.eval_batches, autocast)

    base = pretrained("effml-tiny", device=device)
    results = []

    def record(name, n_kv, model, steps, seconds, train_losses=None):
        row = {"variant": name, "n_kv_heads": n_kv, "heldout_loss": loss_of(model), "steps": steps,
               "cache_bytes_per_token": cache_bytes_per_token(model.config), "seconds": seconds,
               "train_loss_every_10_steps": train_losses}
        results.append(row)
        print(f"{name:14s} {n_kv} KV heads: held-out loss {row['heldout_loss']:.4f}  "
              f"({row['cache_bytes_per_token'] // 1024} KiB/token, {steps} steps, {seconds:.0f} s)")

    record("original", base.config.n_kv_heads, base, 0, 0.0)
    if args.steps:  # the control: the same extra training without conversion
        start, model = time.perf_counter(), copy.deepcopy(base)
        losses = continue_training(model, train_tokens, args.steps, args.batch_size, args.seq_len, args.lr, device, autocast)
        record("uptrained", base.config.n_kv_heads, model, args.steps, time.perf_counter() - start, losses)
    for n_kv in args.kv_heads:
        start = time.perf_counter()
        model = mha_to_gqa(base, n_kv)
        record("converted", n_kv, model, 0, time.perf_counter() - start)
        if not args.steps:
            continue
        start = time.perf_counter()
        losses = continue_training(model, train_tokens, args.steps, args.batch_size, args.seq_len, args.lr, device, autocast)
        record("uptrained", n_kv, model, args.steps, time.perf_counter() - start, losses)
        start = time.perf_counter()
        torch.manual_seed(0)
        scratch = Transformer(dataclasses.replace(base.config, n_kv_heads=n_kv)).to(device)
        losses = continue_training(scratch, train_tokens, args.steps, args.batch_size, args.seq_len, args.scratch_lr,
                                   device, autocast)
        record("from scratch", n_kv, scratch, args.steps, time.perf_counter() - start, losses)

    meta = json.loads((Path(args.data_dir) / "meta.json").read_text()) if args.data_dir else None
    payload = {"model": "effml-tiny", "n_heads": base.config.n_heads, "seq_len": args.seq_len,
               "uptraining": {"steps": args.steps, "batch_size": args.batch_size, "lr": args.lr,
                              "scratch_lr": args.scratch_lr,
                              "fraction_of_pretraining_steps": args.steps / PRETRAINING_STEPS},
               "heldout_batches": args.eval_batches or "all", "corpus": meta, "results": results}
    out = Path(args.out) if args.out else ROOT / "bench" / "results" / device_slug(device) / "gqa_uptrain.json"
    print("wrote", save_result(out, payload, device=device))
    return payload


if __name__ == "__main__":
    main()
