"""Exploration: which compiled-decode variant gets closest to the bandwidth bound, and where a
decode step's time goes (GPU only).

    python bench/decode_variants.py --variants kernel,sdpa,fused,kernel#2,sdpa#2

Builds a Llama-2-7B-shaped model with random bf16 weights and times ``generate(compile=True)`` under
each variant:
  kernel  the library's default: attention by the split-K Triton decode kernel (a custom op that
          the CUDA graph launches as it is), inductor with coordinate-descent tuning
  sdpa    attention by SDPA under a per-sequence mask over the whole static cache (the path before
          the cache protocol), everything else the same
  fused   the default with q/k/v and gate/up weights concatenated: one matrix-vector product each
          instead of three and two (fewer, larger kernels per layer)
A variant named twice (``kernel#2``) is compiled and tuned afresh, which shows how far inductor's
tuning moves the result between compilations. Then it profiles 64 compiled steps of each and reports the GPU time of kernels per token against
the wall time per token (the rest is the GPU idle between kernels) and the top kernels.
Results: bench/results/<device>/decode_variants.json.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from decode import bytes_per_token, decode_rate, device_slug  # noqa: E402

from effml_lib import attention, decoding  # noqa: E402
from effml_lib.kvcache import MODEL_SHAPES, StaticKVCache  # noqa: E402
from effml_lib.measure import copy_bandwidth, save_result  # noqa: E402
from effml_lib.model import ModelConfig, Transformer, fuse_projections  # noqa: E402


def random_model(config, device, dtype):
    with torch.device("meta"):
        model = Transformer(config)
    model = model.to_empty(device=device).to(dtype)
    gen = torch.Generator(device=device).manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            else:
                p.normal_(0, 0.02, generator=gen)
    return model.eval()


def compile_step():
    """A fresh compiled decode step with the library's options."""
    torch._dynamo.reset()
    decoding._compiled_decode_step = None
    return decoding.compiled_decode_step()


def _profiled(run, n_tokens: int):
    """(wall seconds, {kernel: (GPU us, calls)}) of one ``run(n_tokens)``."""
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
        start = time.perf_counter()
        run(n_tokens)
        torch.cuda.synchronize()
        wall = time.perf_counter() - start
    kernels = {e.key: (e.self_device_time_total, e.count) for e in prof.key_averages()
               if e.device_type == torch.autograd.DeviceType.CUDA}
    return wall, kernels


def profile_step(run, n_tokens: int, top: int = 12) -> dict:
    """Where a decode step's time goes: kernels' GPU time and wall time per token, from the
    difference of ``run(n_tokens)`` and ``run(1)`` (so prefill and setup cancel, as in decode.py);
    the ``top`` kernels by time."""
    wall_n, kernels_n = _profiled(run, n_tokens)
    wall_1, kernels_1 = _profiled(run, 1)
    steps = n_tokens - 1
    per_token = {name: ((us - kernels_1.get(name, (0, 0))[0]) / steps, (calls - kernels_1.get(name, (0, 0))[1]) / steps)
                 for name, (us, calls) in kernels_n.items()}
    slowest = sorted(per_token.items(), key=lambda item: -item[1][0])[:top]
    return {
        "wall_us_per_token": (wall_n - wall_1) / steps * 1e6,
        "kernel_us_per_token": sum(us for us, _ in per_token.values()),
        "kernel_calls_per_token": sum(calls for _, calls in per_token.values()),
        "top_kernels": [{"name": name[:90], "us_per_token": us, "calls_per_token": calls} for name, (us, calls) in slowest],
    }


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--variants", default="kernel,sdpa,fused")
    p.add_argument("--new-tokens", type=int, default=256)
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--out", default=None, help="default: bench/results/<device>")
    args = p.parse_args()
    device = torch.device("cuda")
    config = ModelConfig(**MODEL_SHAPES["llama-2-7b"], max_seq_len=args.prompt_len + args.new_tokens, norm_eps=1e-5)
    bandwidth = copy_bandwidth(device, nbytes=2 * 2**30)
    print(f"copy bandwidth {bandwidth / 1e12:.2f} TB/s", flush=True)
    prompt = torch.randint(0, config.vocab_size, (1, args.prompt_len), device=device)
    b = bytes_per_token(config, 2, args.prompt_len + args.new_tokens / 2)["total"]
    results, reference = {}, None
    for label in args.variants.split(","):
        name = label.split("#")[0]  # "kernel#2": the same variant again, compiled afresh
        model = random_model(config, device, torch.bfloat16)
        if name == "fused":
            fuse_projections(model)
        attention.TRITON_MAX_ROWS = 0 if name == "sdpa" else 64  # 0: auto never picks the kernel
        cache = StaticKVCache.for_model(model, 1)
        compile_step()
        run = lambda n: decoding.generate(model, prompt, n, cache=cache, compile=True)  # noqa: E731
        start = time.perf_counter()
        r = decode_rate(run, args.new_tokens, device, args.reps)
        tokens = run(64)
        reference = tokens if reference is None else reference
        r["same_tokens_as_first_variant"] = bool(torch.equal(tokens, reference))
        r["fraction_of_copy_bandwidth"] = r["tokens_per_s"] * b / bandwidth
        r["profile"] = profile_step(run, 64)
        r["seconds"] = time.perf_counter() - start
        results[label] = r
        prof = r["profile"]
        print(f"{label:9s} {r['tokens_per_s']:7.1f} tok/s {100 * r['fraction_of_copy_bandwidth']:5.1f}% of copy; "
              f"per token: wall {prof['wall_us_per_token']:.0f} us, kernels {prof['kernel_us_per_token']:.0f} us "
              f"({r['seconds']:.0f} s)", flush=True)
        for k in prof["top_kernels"][:8]:
            print(f"    {k['us_per_token']:8.1f} us/token  x{k['calls_per_token']:5.1f}  {k['name']}")
        del model, cache
        torch.cuda.empty_cache()
    attention.TRITON_MAX_ROWS = 64
    out = Path(args.out) if args.out else ROOT / "bench" / "results" / device_slug(device)
    save_result(out / "decode_variants.json",
                {"bandwidth": bandwidth, "bytes_per_token": b, "weights_bf16": True, "variants": results}, device=device)
    print(f"wrote {out / 'decode_variants.json'}")


if __name__ == "__main__":
    main()
