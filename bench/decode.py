"""Decode throughput at batch 1 with the static KV cache, against the memory-bandwidth bound.

    python bench/decode.py                    # on a GPU: Llama-2-7B shape; on a CPU: effml-tiny
    python bench/decode.py --model effml-tiny # the course model on whatever device is here

At batch 1 every decode step reads all the weights (and the cache) once and does ~2 FLOPs per weight,
far too little arithmetic to hide the reads: tokens/s is bounded by
    memory bandwidth / bytes read per token.
We measure the bandwidth in the same run (a device-to-device copy, bytes read + written) and report
each decoder's implied bytes/s as a fraction of it.

Decoders, all greedy, same prompt, same shapes:
  ours-eager       effml_lib.decoding.generate, eager PyTorch
  ours-compiled    the same with compile=True: torch.compile + CUDA graphs over the static cache, attention
                   by the split-K decode kernel reading each sequence's cache up to its length
  hf-eager         Hugging Face transformers' generate (no compilation), same weights (GPU runs only)

tok/s is measured as (N - 1) / (T(N new tokens) - T(1 new token)): prefill and setup cancel out.
Results: bench/results/<device>/decode.json and decode.png.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from effml_lib import checkpoints  # noqa: E402
from effml_lib.decoding import generate  # noqa: E402
from effml_lib.kvcache import MODEL_SHAPES, StaticKVCache, kv_cache_bytes  # noqa: E402
from effml_lib.measure import copy_bandwidth, device_slug, env_info, save_result  # noqa: E402
from effml_lib.model import ModelConfig, Transformer  # noqa: E402


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device, reps: int) -> float:
    """Median wall time of fn() over reps, synchronised (the whole generate call is the unit)."""
    times = []
    for _ in range(reps):
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def decode_rate(run, n_new: int, device, reps: int) -> dict:
    """tok/s of the decode phase: (N-1) / (T(N) - T(1)). ``run(n)`` generates n new tokens."""
    run(n_new)  # warm-up: compilation, graph capture, allocator
    run(1)
    t_full = timed(lambda: run(n_new), device, reps)
    t_one = timed(lambda: run(1), device, reps)
    return {"tokens_per_s": (n_new - 1) / (t_full - t_one), "t_full_s": t_full, "t_prefill_s": t_one}


def bytes_per_token(config: ModelConfig, dtype_bytes: int, context: float, cached_len: int | None = None) -> dict:
    """Bytes one decode step must read: every weight except the embedding table (one row of it),
    plus the K/V of ``context`` tokens (``cached_len`` when the step reads the whole static cache)."""
    d, h, kv, hd, f, v, n = (config.dim, config.n_heads, config.n_kv_heads, config.head_dim,
                             config.hidden_dim, config.vocab_size, config.n_layers)
    per_layer = d * h * hd + 2 * d * kv * hd + h * hd * d + 3 * d * f + 2 * d
    weights = (n * per_layer + d + v * d + d) * dtype_bytes  # layers, final norm, LM head, one embedding row
    read_len = context if cached_len is None else cached_len
    cache = kv_cache_bytes(1, 1, config.n_layers, config.n_kv_heads, config.head_dim, dtype_bytes) * read_len
    return {"weights": weights, "kv_cache": cache, "total": weights + cache}


def hf_llama(config: ModelConfig, dtype, device):
    """A Hugging Face LlamaForCausalLM with random weights and our config's shapes (test-only reference)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    hf_config = LlamaConfig(
        vocab_size=config.vocab_size, hidden_size=config.dim, intermediate_size=config.hidden_dim,
        num_hidden_layers=config.n_layers, num_attention_heads=config.n_heads,
        num_key_value_heads=config.n_kv_heads, max_position_embeddings=config.max_seq_len,
        rope_theta=config.rope_theta, rms_norm_eps=config.norm_eps, tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(hf_config).to(dtype)
    return model.eval()


def ours_sharing_hf_weights(hf_model, config: ModelConfig) -> Transformer:
    """Our Transformer over the *same* tensors as the HF model (renamed, not copied)."""
    names = checkpoints.hf_to_effml_names(config.n_layers)
    state = {names[k]: v for k, v in hf_model.state_dict().items() if k in names}
    with torch.device("meta"):
        model = Transformer(config)
    model.load_state_dict(state, assign=True)
    return model.eval()


def run_gpu_llama(args, device) -> dict:
    shape = MODEL_SHAPES[args.shape]
    config = ModelConfig(**shape, max_seq_len=args.prompt_len + args.new_tokens, norm_eps=1e-5)
    dtype = torch.bfloat16
    bandwidth = copy_bandwidth(device, nbytes=2 * 2**30)
    print(f"copy bandwidth: {bandwidth / 1e12:.2f} TB/s (bytes read + written)")

    hf = hf_llama(config, dtype, device)
    ours = ours_sharing_hf_weights(hf, config)
    n_params = sum(p.numel() for p in ours.parameters())
    print(f"{args.shape}: {n_params / 1e9:.2f} B parameters, {dtype}")

    gen = torch.Generator(device="cpu").manual_seed(0)
    prompt = torch.randint(0, config.vocab_size, (1, args.prompt_len), generator=gen).to(device)
    with torch.no_grad():  # the two models must agree before their speeds mean anything
        ref, got = hf(prompt).logits.float(), ours(prompt).float()
    agreement = {
        "max_abs_logit_diff": (ref - got).abs().max().item(),
        "relative_l2_error": ((ref - got).norm() / ref.norm()).item(),
        "top1_agreement": (ref.argmax(-1) == got.argmax(-1)).float().mean().item(),
    }
    print(f"ours vs hf on the prompt (bf16): {agreement}")

    cache = StaticKVCache.for_model(ours, batch_size=1)
    results = {}

    def ours_run(n, compile):
        return generate(ours, prompt, n, cache=cache, compile=compile)

    def hf_run(n):
        with torch.no_grad():
            return hf.generate(prompt, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                               pad_token_id=0, eos_token_id=None)

    for name, run in [("ours-eager", lambda n: ours_run(n, False)),
                      ("ours-compiled", lambda n: ours_run(n, True)),
                      ("hf-eager", hf_run)]:
        start = time.perf_counter()
        r = decode_rate(run, args.new_tokens, device, args.reps)
        mean_context = args.prompt_len + args.new_tokens / 2
        b = bytes_per_token(config, 2, mean_context)  # every decoder reads the cache up to the context
        r.update(bytes_per_token=b["total"], weight_bytes=b["weights"], kv_bytes_per_token=b["kv_cache"],
                 implied_bytes_per_s=r["tokens_per_s"] * b["total"],
                 fraction_of_copy_bandwidth=r["tokens_per_s"] * b["total"] / bandwidth,
                 bench_seconds=time.perf_counter() - start)
        results[name] = r
        print(f"{name:14s} {r['tokens_per_s']:8.1f} tok/s  {r['implied_bytes_per_s'] / 1e12:5.2f} TB/s  "
              f"{100 * r['fraction_of_copy_bandwidth']:5.1f}% of copy bandwidth")

    return {
        "model": args.shape, "parameters": n_params, "dtype": str(dtype), "batch_size": 1,
        "prompt_len": args.prompt_len, "new_tokens": args.new_tokens, "reps": args.reps,
        "copy_bandwidth_bytes_per_s": bandwidth, "logits_vs_hf": agreement,
        "compiled_vs_hf_eager": results["ours-compiled"]["tokens_per_s"] / results["hf-eager"]["tokens_per_s"],
        "decoders": results,
    }


def run_course_model(args, device) -> dict:
    model = checkpoints.pretrained(args.model, device=device)
    config = model.config
    bandwidth = copy_bandwidth(device, nbytes=256 * 2**20)
    gen = torch.Generator(device="cpu").manual_seed(0)
    prompt = torch.randint(0, config.vocab_size, (1, args.prompt_len), generator=gen).to(device)
    cache = StaticKVCache.for_model(model, 1, max_seq_len=args.prompt_len + args.new_tokens)
    results = {}
    decoders = [("ours-eager", False)] + ([("ours-compiled", True)] if args.compile else [])
    for name, compile in decoders:
        r = decode_rate(lambda n: generate(model, prompt, n, cache=cache, compile=compile), args.new_tokens, device, args.reps)
        # without the Triton kernel (a CPU), attention is SDPA under a mask over the whole cache
        cached_len = cache.max_seq_len if device.type != "cuda" else None
        b = bytes_per_token(config, 4, args.prompt_len + args.new_tokens / 2, cached_len)
        r.update(bytes_per_token=b["total"], implied_bytes_per_s=r["tokens_per_s"] * b["total"],
                 fraction_of_copy_bandwidth=r["tokens_per_s"] * b["total"] / bandwidth)
        results[name] = r
        print(f"{name:14s} {r['tokens_per_s']:8.1f} tok/s  {100 * r['fraction_of_copy_bandwidth']:5.1f}% of copy bandwidth")
    return {"model": args.model, "parameters": model.num_parameters(), "dtype": "torch.float32", "batch_size": 1,
            "prompt_len": args.prompt_len, "new_tokens": args.new_tokens, "reps": args.reps,
            "copy_bandwidth_bytes_per_s": bandwidth, "decoders": results}


def plot(result: dict, path: Path, device_name: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import seaborn as sns

    names = list(result["decoders"])
    rates = [result["decoders"][n]["tokens_per_s"] for n in names]
    fastest = max(names, key=lambda n: result["decoders"][n]["tokens_per_s"])
    bound = result["copy_bandwidth_bytes_per_s"] / result["decoders"][fastest]["bytes_per_token"]
    fig, ax = plt.subplots(figsize=(6.5, 3.6))
    sns.barplot(x=rates, y=names, ax=ax, orient="h", color="tab:blue")
    ax.axvline(bound, color="tab:red", linestyle="--", label=f"bandwidth bound ({bound:.0f} tok/s)")
    for i, r in enumerate(rates):
        ax.text(r, i, f" {r:.0f}", va="center")
    ax.set_xlabel("decode throughput (tokens/s, batch 1)")
    ax.set_ylabel("decoder")
    ax.set_title(f"{result['model']} decode on {device_name}")
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="effml-tiny / effml-tiny-draft (default on GPU: --shape)")
    p.add_argument("--shape", default="llama-2-7b", choices=sorted(MODEL_SHAPES))
    p.add_argument("--device", default=None)
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=256)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--compile", action="store_true", help="also time compile=True for the course model")
    p.add_argument("--out", default=None, help="results directory (default bench/results/<device>)")
    args = p.parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    env = env_info(device)
    if device.type == "cuda" and args.model is None:
        result = run_gpu_llama(args, device)
        stem = "decode"
    else:
        args.model = args.model or "effml-tiny"
        result = run_course_model(args, device)
        stem = f"decode-{args.model}"
    device_name = env.get("device_name") or device.type
    out = Path(args.out) if args.out else ROOT / "bench" / "results" / device_slug(device)
    save_result(out / f"{stem}.json", result, device=device)
    plot(result, out / f"{stem}.png", device_name)
    print(f"wrote {out / f'{stem}.json'}")


if __name__ == "__main__":
    main()
