"""Exploration: which compiled-decode variant gets closest to the bandwidth bound (GPU only).

    python bench/decode_variants.py --variants base,cdt

Builds a Llama-2-7B-shaped model with random bf16 weights and times ``generate(compile=True)``
under each variant (base: inductor defaults; cdt: coordinate-descent tuning of the generated
kernels, the library's default), then profiles the last one and prints its top kernels.
Variants tried and dropped: concatenating q/k/v and gate/up weights (no gain once tuned).
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

from effml_lib import decoding  # noqa: E402
from effml_lib.kvcache import MODEL_SHAPES, StaticKVCache  # noqa: E402
from effml_lib.measure import copy_bandwidth, save_result  # noqa: E402
from effml_lib.model import ModelConfig, Transformer  # noqa: E402


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


def set_variant(name):
    """Install the compiled decode step for a variant: the library's options, with or without tuning."""
    import torch._inductor.config as inductor

    torch._dynamo.reset()
    inductor.triton.unique_kernel_names = True
    options = {"triton.cudagraphs": True, "coordinate_descent_tuning": name == "cdt"}
    decoding._compiled_decode_step = torch.compile(decoding.decode_step, fullgraph=True, options=options)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--variants", default="base,cdt")
    p.add_argument("--new-tokens", type=int, default=256)
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--out", default=None, help="default: bench/results/<device>")
    args = p.parse_args()
    device = torch.device("cuda")
    config = ModelConfig(**MODEL_SHAPES["llama-2-7b"], max_seq_len=args.prompt_len + args.new_tokens, norm_eps=1e-5)
    bandwidth = copy_bandwidth(device, nbytes=2 * 2**30)
    model = random_model(config, device, torch.bfloat16)
    prompt = torch.randint(0, config.vocab_size, (1, args.prompt_len), device=device)
    cache = StaticKVCache.for_model(model, 1)
    b = bytes_per_token(config, 2, 0, cached_len=config.max_seq_len)["total"]
    results = {}
    for name in args.variants.split(","):
        set_variant(name)
        start = time.perf_counter()
        r = decode_rate(lambda n: decoding.generate(model, prompt, n, cache=cache, compile=True), args.new_tokens, device, 3)
        r["fraction_of_copy_bandwidth"] = r["tokens_per_s"] * b / bandwidth
        r["seconds"] = time.perf_counter() - start
        results[name] = r
        print(f"{name:8s} {r['tokens_per_s']:7.1f} tok/s {100 * r['fraction_of_copy_bandwidth']:5.1f}% ({r['seconds']:.0f} s)", flush=True)

    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        decoding.generate(model, prompt, 32, cache=cache, compile=True)
        torch.cuda.synchronize()
    table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=18, max_name_column_width=60)
    print(table)
    out = Path(args.out) if args.out else ROOT / "bench" / "results" / device_slug(device)
    save_result(out / "decode_variants.json",
                {"bandwidth": bandwidth, "bytes_per_token": b, "variants": results, "profile_top": table}, device=device)


if __name__ == "__main__":
    main()
