"""Train the course's own models on the Python standard library's source.

    python -m effml_lib.train --preset effml-tiny --steps 4000 --out runs/effml-tiny

Each run writes to ``--out``: the checkpoint (``config.json`` + fp16 ``model.safetensors``, the
config carrying the command, held-out perplexity and a greedy sample), ``log.csv`` (one row per
logged step) and ``loss.png``. The shipped checkpoints in ``effml_lib/assets/checkpoints`` are
copies of such runs; ``docs/MODELS.md`` lists the exact commands.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import csv
import json
import math
import shlex
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from . import checkpoints, data
from .decoding import generate
from .device import get_device
from .measure import env_info
from .model import ModelConfig, Transformer
from .tokenizer import load_tokenizer

PRESETS: dict[str, dict] = {
    # ~17 M parameters, multi-head attention (module 04 converts it to GQA)
    "effml-tiny": dict(vocab_size=4096, dim=384, n_layers=8, n_heads=6, n_kv_heads=6, hidden_dim=1024, max_seq_len=2048),
    # ~4 M parameters (under a quarter of effml-tiny), same tokenizer: the draft for speculative decoding
    "effml-tiny-draft": dict(vocab_size=4096, dim=256, n_layers=4, n_heads=4, n_kv_heads=4, hidden_dim=640, max_seq_len=2048, tie_embeddings=True),
    # for tests: trains in seconds on a CPU
    "test": dict(vocab_size=4096, dim=64, n_layers=2, n_heads=4, n_kv_heads=4, hidden_dim=128, max_seq_len=256, tie_embeddings=True),
}

SAMPLE_PROMPT = "import os\n\n\ndef"


def lr_at(step: int, max_lr: float, warmup: int, total: int, min_ratio: float = 0.1) -> float:
    """Linear warm-up, then cosine decay to ``min_ratio * max_lr``."""
    if step < warmup:
        return max_lr * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return max_lr * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


@torch.no_grad()
def evaluate(model, tokens, seq_len: int, batch_size: int, device, max_batches: int | None = None, autocast=None) -> float:
    """Mean next-token cross-entropy (nats) over held-out windows (all of them unless max_batches)."""
    autocast = autocast or contextlib.nullcontext
    model.eval()
    total_loss, total_count = 0.0, 0
    for i, (x, y) in enumerate(data.sequential_batches(tokens, batch_size, seq_len)):
        if max_batches is not None and i >= max_batches:
            break
        x, y = x.to(device), y.to(device)
        with autocast():
            logits = model.forward_unchecked(x)
        loss = F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), reduction="sum")
        total_loss += loss.item()
        total_count += y.numel()
    model.train()
    return total_loss / total_count


def configure_optimizer(model, lr: float, weight_decay: float):
    """AdamW; weight decay on matrices only (not norms' gains or biases)."""
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    fused = next(model.parameters()).is_cuda
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95), eps=1e-8, fused=fused)


def continue_training(model, train_tokens, steps: int, batch_size: int, seq_len: int, lr: float, device,
                      autocast=None, seed: int = 0) -> list[float]:
    """A short run of further training (fine-tuning, uptraining after a conversion): AdamW, warm-up
    over a tenth of the steps, cosine decay, clipped gradients. Returns the loss every 10 steps."""
    autocast = autocast or contextlib.nullcontext
    model.train()
    optimizer = configure_optimizer(model, lr, weight_decay=0.1)
    generator = torch.Generator().manual_seed(seed)
    losses = []
    for step in range(steps):
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, lr, warmup=max(1, steps // 10), total=steps)
        x, y = data.random_batches(train_tokens, batch_size, seq_len, generator, device=device)
        with autocast():
            logits = model.forward_unchecked(x)
        loss = F.cross_entropy(logits.float().flatten(0, 1), y.flatten())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        if step % 10 == 0 or step == steps - 1:
            losses.append(loss.item())
    model.eval()
    return losses


def load_split_tokens(split: str, data_dir: str | None) -> torch.Tensor:
    if data_dir is None:
        return data.load_tokens(split)
    path = Path(data_dir) / f"{split}.pt"
    if not path.exists():
        raise FileNotFoundError(f"missing token file {path}; make it with --prepare-only --data-dir {data_dir}")
    return torch.load(path, weights_only=True).long()


def corpus_info(data_dir: str | None) -> dict:
    """What the run trained on: the Python whose stdlib it is, and the splits' fingerprints."""
    if data_dir is not None:
        return json.loads((Path(data_dir) / "meta.json").read_text())
    info = {"python": sys.version.split()[0]}
    for split in ("train", "heldout"):
        info[f"{split}_fingerprint"] = data.corpus_fingerprint(split)
    return info


def train(args) -> dict:
    torch.manual_seed(args.seed)
    device = get_device(args.device)
    tokenizer = load_tokenizer()
    train_tokens = load_split_tokens("train", args.data_dir).to(device)
    heldout_tokens = load_split_tokens("heldout", args.data_dir)

    config = ModelConfig(**PRESETS[args.preset])
    if config.vocab_size != tokenizer.vocab_size:
        raise ValueError(f"preset vocab_size {config.vocab_size} != tokenizer's {tokenizer.vocab_size}")
    model = Transformer(config).to(device)
    n_params = model.num_parameters()
    print(f"{args.preset}: {n_params / 1e6:.2f} M parameters on {device}; "
          f"{train_tokens.numel() / 1e6:.2f} M train tokens, {heldout_tokens.numel() / 1e6:.2f} M held-out")

    use_bf16 = device.type == "cuda"

    def autocast():
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=use_bf16)

    step_model = torch.compile(model.forward_unchecked) if args.compile else model.forward_unchecked
    optimizer = configure_optimizer(model, args.lr, args.weight_decay)
    generator = torch.Generator().manual_seed(args.seed)
    log, best = [], {"loss": float("inf"), "step": -1, "state": None}
    start = time.perf_counter()
    progress = tqdm(range(args.steps), desc=f"training {args.preset}", unit="step", mininterval=2.0)
    deadline = start + 60 * args.time_limit_min if args.time_limit_min else None
    for step in progress:
        if deadline is not None and time.perf_counter() > deadline:
            print(f"time limit reached after {step} steps; keeping the best checkpoint so far")
            args.steps_done = step
            break
        lr = lr_at(step, args.lr, args.warmup, args.steps)
        for group in optimizer.param_groups:
            group["lr"] = lr
        x, y = data.random_batches(train_tokens, args.batch_size, args.seq_len, generator)
        with autocast():
            logits = step_model(x)
        loss = F.cross_entropy(logits.float().flatten(0, 1), y.flatten())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
        optimizer.step()

        last = step == args.steps - 1 or (deadline is not None and time.perf_counter() > deadline)
        if step % args.log_every == 0 or last:
            row = {"step": step, "tokens": (step + 1) * args.batch_size * args.seq_len, "lr": lr,
                   "train_loss": loss.item(), "heldout_loss": float("nan"),
                   "elapsed_s": time.perf_counter() - start}
            if step % args.eval_every == 0 or last:
                row["heldout_loss"] = evaluate(model, heldout_tokens, args.seq_len, args.batch_size, device,
                                               max_batches=args.eval_batches, autocast=autocast)
                if row["heldout_loss"] < best["loss"]:
                    best = {"loss": row["heldout_loss"], "step": step,
                            "state": copy.deepcopy({k: v.detach().cpu() for k, v in model.state_dict().items()})}
            log.append(row)
            progress.set_postfix(loss=f"{row['train_loss']:.3f}", heldout=f"{best['loss']:.3f}")

    train_seconds = time.perf_counter() - start
    model.load_state_dict(best["state"])  # keep the checkpoint with the best held-out loss
    # the shipped weights are fp16: measure the model as it will be loaded
    model = model.half().float()
    heldout_loss = evaluate(model, heldout_tokens, args.seq_len, args.batch_size, device, autocast=autocast)
    prompt = tokenizer.encode(SAMPLE_PROMPT)
    sample_ids = generate(model, prompt, max_new_tokens=200)[0].tolist()
    sample = tokenizer.decode(sample_ids)
    summary = {
        "preset": args.preset,
        "parameters": n_params,
        "command": "python -m effml_lib.train " + shlex.join(args.argv),
        "steps": args.steps,
        "steps_done": getattr(args, "steps_done", args.steps),
        "best_step": best["step"],
        "train_tokens_seen": getattr(args, "steps_done", args.steps) * args.batch_size * args.seq_len,
        "train_seq_len": args.seq_len,
        "heldout_loss": heldout_loss,
        "heldout_perplexity": math.exp(heldout_loss),
        "heldout_tokens": heldout_tokens.numel(),
        "train_seconds": train_seconds,
        "tokenizer": tokenizer.name,
        "corpus": corpus_info(args.data_dir),
        "greedy_sample_prompt": SAMPLE_PROMPT,
        "greedy_sample": sample,
        "env": env_info(device),
    }
    out = Path(args.out)
    checkpoints.save(model, out, dtype=torch.float16, metadata={"training": summary})
    with open(out / "log.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(log[0]))
        writer.writeheader()
        writer.writerows(log)
    plot_log(log, out / "loss.png", title=args.preset)
    print(json.dumps({k: v for k, v in summary.items() if k != "env"}, indent=2))
    return summary


def plot_log(log: list[dict], path, title: str) -> None:
    """Train (one batch per point) and held-out loss against tokens seen, saved as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import pandas as pd

    from .plots import loss_curves, set_style

    rows = [{"tokens_M": r["tokens"] / 1e6, "loss": r["train_loss"], "run": "train (one batch)"} for r in log]
    rows += [{"tokens_M": r["tokens"] / 1e6, "loss": r["heldout_loss"], "run": "held-out"}
             for r in log if not math.isnan(r["heldout_loss"])]
    set_style()
    fig, ax = plt.subplots(figsize=(6, 4))
    loss_curves(pd.DataFrame(rows), x="tokens_M", y="loss", hue="run", ax=ax,
                xlabel="training tokens (millions)", title=f"{title}: training loss")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def prepare(data_dir: str) -> None:
    """Tokenize both splits once and save them, so training can run on another machine."""
    out = Path(data_dir)
    out.mkdir(parents=True, exist_ok=True)
    meta = {"python": sys.version.split()[0], "tokenizer": load_tokenizer().name}
    for split in ("train", "heldout"):
        tokens = data.load_tokens(split)
        torch.save(tokens.to(torch.int16), out / f"{split}.pt")
        meta[f"{split}_fingerprint"] = data.corpus_fingerprint(split)
        meta[f"{split}_tokens"] = tokens.numel()
        print(f"{split}: {tokens.numel()} tokens -> {out / f'{split}.pt'}")
    (out / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS), default="effml-tiny")
    p.add_argument("--steps", type=int, default=4000)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--lr", type=float, default=1.5e-3)
    p.add_argument("--warmup", type=int, default=200)
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--grad-clip", type=float, default=1.0)
    p.add_argument("--log-every", type=int, default=50)
    p.add_argument("--eval-every", type=int, default=250)
    p.add_argument("--eval-batches", type=int, default=20, help="held-out batches per periodic eval")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--time-limit-min", type=float, default=None, help="stop early (keeping the best checkpoint)")
    p.add_argument("--device", default=None, help="cpu, cuda, ... (default: the best available)")
    p.add_argument("--compile", action="store_true", help="torch.compile the forward pass")
    p.add_argument("--data-dir", default=None, help="train.pt/heldout.pt from --prepare-only (default: build here)")
    p.add_argument("--prepare-only", action="store_true", help="only tokenize the corpus into --data-dir")
    p.add_argument("--out", default=None, help="output directory (default: runs/<preset>)")
    args = p.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    for name in ("steps", "batch_size", "seq_len", "log_every", "eval_every"):
        if getattr(args, name) <= 0:
            p.error(f"--{name.replace('_', '-')} must be positive")
    if args.out is None:
        args.out = f"runs/{args.preset}"
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.prepare_only:
        if args.data_dir is None:
            raise SystemExit("--prepare-only needs --data-dir")
        prepare(args.data_dir)
        return
    train(args)


if __name__ == "__main__":
    main()
