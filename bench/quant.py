"""Weight-only quantization on a GPU: the W8A16 / W4A16 kernel alone, then whole decode steps.

    python bench/quant.py                       # everything, on a GPU: bench/results/<device>/quant.json
    python bench/quant.py --parts gemv,sweep    # some parts only (the others are not run)
    python bench/quant.py --parts smollm2       # on a CPU too: SmolLM2's real decode, fp16/fp32 vs W4
    EFFML_DECODE_VARIANTS=int4pack-g128 python bench/quant.py --parts decode --name quant_decode_int4pack
                                                # some decoders only (bf16, w4-g128, w8, int4pack-g128)
    python bench/quant.py --parts decode --profile   # and each decoder's kernels per token (torch.profiler)

Parts:
  sweep     GEMV tiles (BLOCK_N, CHUNKS, warps) at batch 1 on Llama-2-7B's three layer shapes
  sweep-gemm  GEMM tiles at 16 and 64 rows on 4096 -> 11008 and 11008 -> 4096
  gemv      batch-1 time of each layer shape of Llama-2-7B (and the fused q/k/v and gate/up shapes): bf16 (cuBLAS), ours W8 / W4 g128, and
            torch's tinygemm int4 kernel (_weight_int4pack_mm, group 128, gpt-fast's int4) on the same
            weights; bandwidth counted on the bytes each reads (packed codes, scales, zero points)
  batch     the same 4096 -> 11008 layer at batch 1 .. 256: where W4A16 stops beating bf16 (the GEMV
            serves up to GEMV_MAX_ROWS rows, the tiled GEMM beyond)
  decode    the Llama-2-7B shape (random weights), compiled decode (torch.compile + CUDA graphs):
            bf16, ours W8 (per channel), ours W4 g128, and tinygemm int4 g128 swapped in the same way,
            each quantized one with its q/k/v and gate/up projections fused (model.fuse_projections) and not;
            w8-fused-tile-4x128x4 is W8 fused with another GEMV tile than the library's default
  smollm2   SmolLM2-135M-Instruct from its GGUF file (checkpoints.load_gguf): 16-bit vs our W4 g32, and
            the file's own Q4_1 kept as QuantLinear (load_gguf(..., quantized=True))

Kernel times come from CUDA graphs of many calls (no launch overhead between them) that rotate
through copies of the weights larger than L2 together, so every call reads its weight from HBM.
Bandwidth is compared with a device-to-device copy measured in the same run.
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from decode import bytes_per_token, decode_rate  # noqa: E402
from decode_variants import profile_step, random_model  # noqa: E402

from effml_lib import checkpoints, decoding  # noqa: E402
from effml_lib.decoding import generate  # noqa: E402
from effml_lib.kvcache import MODEL_SHAPES, StaticKVCache  # noqa: E402
from effml_lib.measure import copy_bandwidth, device_slug, env_info, save_result  # noqa: E402
from effml_lib.model import ModelConfig, fuse_projections  # noqa: E402
from effml_lib.quant import QuantLinear, quantize_model, unpack_int4  # noqa: E402

PARTS = ("sweep", "sweep-gemm", "gemv", "batch", "decode", "smollm2")
L2_BYTES = 50 * 2**20  # H100/H200: 50 MB of L2; the rotation covers at least 4x that


# --- timing -----------------------------------------------------------------------------------------

def graph_ms(calls, iters: int = 60, rounds: int = 7) -> float:
    """Median ms per call of ``calls`` (zero-argument callables, used in turn) replayed in a CUDA graph."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm-up outside the capture: compilation, autotuning, allocator
        for call in calls:
            call()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(iters):
            calls[i % len(calls)]()
    graph.replay()
    times = []
    for _ in range(rounds):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / iters)
    del graph
    return sorted(times)[len(times) // 2]


def copies_for(nbytes: int) -> int:
    """How many copies of a weight of ``nbytes`` make the rotation at least 4x L2 (at most 16)."""
    return max(2, min(16, -(-4 * L2_BYTES // nbytes)))


# --- the layers compared ----------------------------------------------------------------------------

class Int4PackLinear(nn.Module):
    """torch's tinygemm int4 kernel (gpt-fast's int4 path): the same asymmetric 4-bit codes and group
    scales as a QuantLinear, repacked into the kernel's layout. ``w = (q - 8) * s + zero_f`` with
    ``zero_f = (8 - z) * s`` is our ``(q - z) * s``: the same weight, up to bf16 rounding."""

    def __init__(self, q: QuantLinear, inner_k_tiles: int = 8):
        super().__init__()
        codes = unpack_int4(q.codes).to(torch.int32)  # (N, K), 0..15
        packed = (codes[:, ::2] << 4 | codes[:, 1::2]).to(torch.uint8)  # tinygemm: even element high
        self.register_buffer("weight", torch._convert_weight_to_int4pack(packed, inner_k_tiles))
        scale = q.scale.float()  # (N, G)
        zero = (8 - q.zero.float()) * scale
        self.register_buffer("scales_and_zeros", torch.stack((scale, zero), dim=-1).transpose(0, 1)
                             .contiguous().to(torch.bfloat16))  # (G, N, 2)
        self.group_size, self.in_features, self.out_features = q.group_size, q.in_features, q.out_features
        self.weight_bytes = q.weight_bytes

    def forward(self, x):
        lead = x.shape[:-1]
        y = torch._weight_int4pack_mm(x.reshape(-1, x.shape[-1]), self.weight, self.group_size, self.scales_and_zeros)
        return y.reshape(*lead, self.out_features)


def layer_variants(linear: nn.Linear, with_int4pack: bool = True) -> dict:
    """The same bf16 layer four ways: name -> (module, bytes of weight it reads)."""
    variants = {"bf16": (linear, linear.weight.numel() * 2)}
    for name, bits, group in (("w8", 8, None), ("w4-g128", 4, 128)):
        q = QuantLinear.from_linear(linear, bits, group, impl="triton")
        variants[name] = (q, q.weight_bytes)
    if with_int4pack:
        try:
            variants["int4pack-g128"] = (Int4PackLinear(variants["w4-g128"][0]), variants["w4-g128"][1])
        except Exception as e:  # noqa: BLE001 - an older torch without the op: recorded, not fatal
            print(f"tinygemm int4 unavailable: {e}")
    return variants


def check_against_reference(variants: dict, x: torch.Tensor) -> dict:
    """Each quantized layer's output vs the reference matmul with its own dequantized weight."""
    errors = {}
    for name, (module, _) in variants.items():
        if name == "bf16":
            continue
        q = variants["w8"][0] if name == "w8" else variants["w4-g128"][0]
        reference = F.linear(x.float(), q.dequantized_weight(torch.float32))
        got = module(x).float()
        errors[name] = ((got - reference).norm() / reference.norm()).item()
    return errors


def random_linear(k: int, n: int, device, seed: int) -> nn.Linear:
    gen = torch.Generator(device=device).manual_seed(seed)
    linear = nn.Linear(k, n, bias=False, device=device, dtype=torch.bfloat16)
    with torch.no_grad():
        linear.weight.normal_(0, 0.02, generator=gen)
    return linear


# --- parts ------------------------------------------------------------------------------------------

SWEEP_SHAPES = ((4096, 4096), (4096, 11008), (11008, 4096), (4096, 12288), (4096, 22016))  # (in, out): Llama-2-7B's layer shapes, then its fused q/k/v and gate/up
SWEEP_WIDTHS = ((4, 128), (8, None))  # (bits, group_size): W4 g128, W8 per channel


def sweep_layers(k, n, bits, group, device):
    return [QuantLinear.from_linear(random_linear(k, n, device, i), bits, group, impl="triton")
            for i in range(copies_for(k * n * bits // 8))]


def run_sweep(device, bandwidth) -> dict:
    """GEMV tiles at batch 1: every (BLOCK_N, warps) on each layer shape and width, one chunk per thread
    and row (CHUNKS = 32 per warp)."""
    from effml_lib.kernels import quant_matmul as qm

    rows = []
    for (k, n), (bits, group) in itertools.product(SWEEP_SHAPES, SWEEP_WIDTHS):
        layers = sweep_layers(k, n, bits, group, device)
        nbytes = layers[0].weight_bytes
        x = torch.randn(1, k, device=device, dtype=torch.bfloat16)
        for block_n, warps in itertools.product((2, 4, 8, 16), (1, 2, 4, 8)):
            tiles = {"block_n": block_n, "chunks": 32 * warps, "num_warps": warps}
            calls = [lambda q=q: qm.quant_matmul(x, q.codes, q.scale, q.zero, None, q.bits, q.group_size,
                                                 q.in_features, gemv=tiles) for q in layers]
            ms = graph_ms(calls, iters=40, rounds=5)
            rows.append({"in": k, "out": n, "bits": bits, "group_size": group, **tiles, "ms": ms,
                         "fraction_of_copy_bandwidth": nbytes / (ms * 1e-3) / bandwidth})
        best = min((r for r in rows if (r["in"], r["out"], r["bits"]) == (k, n, bits)), key=lambda r: r["ms"])
        print(f"sweep {k}->{n} W{bits}: best {best['block_n']} rows x {best['chunks']} chunks, {best['num_warps']} warps: "
              f"{best['ms'] * 1e3:.1f} us, {100 * best['fraction_of_copy_bandwidth']:.0f}% of copy bandwidth")
        del layers
    return {"gemv": rows}


def run_sweep_gemm(device, bandwidth) -> dict:
    """GEMM tiles at a short prefill (16 rows) and a batch (64 rows)."""
    from effml_lib.kernels import quant_matmul as qm

    rows = []
    for (k, n), (bits, group) in itertools.product(SWEEP_SHAPES[1:], SWEEP_WIDTHS):
        layers = sweep_layers(k, n, bits, group, device)
        for m in (16, 64):
            xm = torch.randn(m, k, device=device, dtype=torch.bfloat16)
            for block_n, block_k, warps in itertools.product((32, 64, 128), (128, 256), (4, 8)):
                tiles = {"block_n": block_n, "block_k": block_k, "num_warps": warps}
                calls = [lambda q=q: qm.quant_matmul(xm, q.codes, q.scale, q.zero, None, q.bits, q.group_size,
                                                     q.in_features, gemm=tiles) for q in layers]
                ms = graph_ms(calls, iters=20, rounds=5)
                rows.append({"in": k, "out": n, "bits": bits, "group_size": group, "batch": m, **tiles, "ms": ms})
            best = min((r for r in rows if (r["in"], r["bits"], r["batch"]) == (k, bits, m)), key=lambda r: r["ms"])
            print(f"GEMM {k}->{n} W{bits} batch {m}: best {best['block_n']}x{best['block_k']}, "
                  f"{best['num_warps']} warps: {best['ms'] * 1e3:.1f} us")
        del layers
    return {"gemm": rows}


LLAMA2_7B_LAYERS = {  # (in, out) of each linear layer of one block
    "wq/wk/wv/wo 4096->4096": (4096, 4096),
    "w1/w3 4096->11008": (4096, 11008),
    "w2 11008->4096": (11008, 4096),
    "wqkv 4096->12288 (fused)": (4096, 12288),  # model.fuse_projections: q, k, v stacked
    "w13 4096->22016 (fused)": (4096, 22016),  # gate and up stacked
}


def run_gemv(device, bandwidth) -> dict:
    results = {}
    for label, (k, n) in LLAMA2_7B_LAYERS.items():
        copies = [layer_variants(random_linear(k, n, device, i)) for i in range(copies_for(k * n // 2))]
        x = torch.randn(1, k, device=device, dtype=torch.bfloat16)
        errors = check_against_reference(copies[0], x)
        row = {}
        for name in copies[0]:
            ms = graph_ms([lambda m=c[name][0]: m(x) for c in copies])
            nbytes = copies[0][name][1]
            row[name] = {"ms": ms, "weight_bytes": nbytes, "bytes_per_s": nbytes / (ms * 1e-3),
                         "fraction_of_copy_bandwidth": nbytes / (ms * 1e-3) / bandwidth,
                         "speedup_vs_bf16": None, "relative_error_vs_reference": errors.get(name)}
        for name in row:
            row[name]["speedup_vs_bf16"] = row["bf16"]["ms"] / row[name]["ms"]
        results[label] = row
        print(label + ": " + ", ".join(f"{name} {r['ms'] * 1e3:.1f} us ({100 * r['fraction_of_copy_bandwidth']:.0f}%)"
                                       for name, r in row.items()))
        del copies
    return results


def run_batch(device, bandwidth) -> dict:
    k, n = 4096, 11008
    copies = [layer_variants(random_linear(k, n, device, i)) for i in range(copies_for(k * n // 2))]
    rows = []
    for m in (1, 2, 4, 8, 16, 32, 64, 128, 256):
        x = torch.randn(m, k, device=device, dtype=torch.bfloat16)
        row = {"batch": m}
        for name in copies[0]:
            row[name] = graph_ms([lambda mod=c[name][0]: mod(x) for c in copies], iters=30, rounds=5)
        rows.append(row)
        print(f"batch {m:3d}: " + ", ".join(f"{name} {row[name] * 1e3:.1f} us" for name in copies[0]))
    crossover = {name: next((r["batch"] for r in rows if r[name] >= r["bf16"]), None)
                 for name in copies[0] if name != "bf16"}
    print(f"first batch size where bf16 is as fast or faster: {crossover}")
    return {"layer": f"{k}->{n}", "ms": rows, "crossover_batch": crossover}


def quantized_bytes_per_token(model, config, context) -> float:
    """``bytes_per_token`` with each block's linear layers counted at the bytes they read."""
    dense = bytes_per_token(config, 2, context)
    layer_params = sum(m.in_features * m.out_features for name, m in model.named_modules()
                       if name.startswith("layers.") and isinstance(m, (nn.Linear, QuantLinear, Int4PackLinear)))
    layer_bytes = sum(m.weight_bytes for name, m in model.named_modules()
                      if name.startswith("layers.") and isinstance(m, (QuantLinear, Int4PackLinear)))
    if not layer_bytes:
        return dense["total"]
    return dense["total"] - 2 * layer_params + layer_bytes


def run_decode(device, bandwidth, shape="llama-2-7b", prompt_len=32, new_tokens=64, reps=3, on_progress=None,
               profile=False) -> dict:
    from effml_lib.kernels import quant_matmul as qm  # imports Triton: GPU runs only

    config = ModelConfig(**MODEL_SHAPES[shape], max_seq_len=prompt_len + new_tokens, norm_eps=1e-5)
    gen = torch.Generator(device="cpu").manual_seed(0)
    prompt = torch.randint(0, config.vocab_size, (1, prompt_len), generator=gen).to(device)

    def int4pack(model):
        quantize_model(model, 4, 128, impl="triton")
        replace_in_blocks(model, lambda q: Int4PackLinear(q))
        return model

    def w8_fused(model):
        return quantize_model(fuse_projections(model), 8, None, impl="triton")

    only = os.environ.get("EFFML_DECODE_VARIANTS")  # e.g. "int4pack-g128": re-run some decoders only
    variants = {  # the ones that matter most first: a run cut short still compares them
        "bf16": lambda m: m,  # inductor's own matrix-vector kernels, with the norms and SwiGLU fused in
        # "-fused": q/k/v and gate/up as one layer each (model.fuse_projections): 4 GEMVs a block, not 7
        "w4-g128-fused": lambda m: quantize_model(fuse_projections(m), 4, 128, impl="triton"),
        "w8-fused": w8_fused,
        "int4pack-g128-fused": lambda m: int4pack(fuse_projections(m)),
        "w4-g128": lambda m: quantize_model(m, 4, 128, impl="triton"),
        "w8": lambda m: quantize_model(m, 8, None, impl="triton"),
        "int4pack-g128": int4pack,
        # quant_sweep.json's fastest W8 tile for a fused block (7% less GEMV time than the default's),
        # not yet the library's default: this decoder measures it
        "w8-fused-tile-4x128x4": w8_fused,  # with the tile in tiles_of below
    }
    tiles_of = {"w8-fused-tile-4x128x4": {8: {"block_n": 4, "chunks": 128, "num_warps": 4}}}
    if only:
        variants = {name: make for name, make in variants.items() if name in only.split(",")}
    results, first_tokens = {}, {}
    partial = {"model": shape, "prompt_len": prompt_len, "new_tokens": new_tokens, "reps": reps,
               "decoders": results, "first_16_tokens": first_tokens}
    default_tiles = {bits: dict(t) for bits, t in qm.GEMV_TILES.items()}
    for name, make in variants.items():
        start = time.perf_counter()
        qm.GEMV_TILES.update({bits: dict(t) for bits, t in default_tiles.items()})
        qm.GEMV_TILES.update(tiles_of.get(name, {}))  # read at each call, so at the graph's capture too
        model = make(random_model(config, device, torch.bfloat16))
        cache = StaticKVCache.for_model(model, batch_size=1)
        decoding._compiled_decode_step = None  # a fresh compilation for each model
        try:
            r = decode_rate(lambda n: generate(model, prompt, n, cache=cache, compile=True), new_tokens, device, reps)
        except Exception as e:  # noqa: BLE001 - recorded, the other variants still run
            print(f"{name}: failed: {type(e).__name__}: {e}")
            results[name] = {"error": f"{type(e).__name__}: {e}"}
            continue
        first_tokens[name] = generate(model, prompt, 16, cache=cache, compile=True)[0, prompt_len:].tolist()
        nbytes = quantized_bytes_per_token(model, config, prompt_len + new_tokens / 2)
        r.update(bytes_per_token=nbytes, fraction_of_copy_bandwidth=r["tokens_per_s"] * nbytes / bandwidth,
                 gemv_tiles={str(bits): dict(t) for bits, t in qm.GEMV_TILES.items()})
        if profile:  # where the step's time goes: every kernel's GPU time per token (torch.profiler)
            r["profile"] = profile_step(lambda n: generate(model, prompt, n, cache=cache, compile=True), new_tokens, top=40)
            print(f"  {name}: kernels {r['profile']['kernel_us_per_token']:.0f} us and "
                  f"{r['profile']['kernel_calls_per_token']:.0f} launches per token, wall {r['profile']['wall_us_per_token']:.0f} us")
        r["bench_seconds"] = time.perf_counter() - start
        results[name] = r
        print(f"decode {name:14s} {r['tokens_per_s']:7.1f} tok/s, {nbytes / 1e9:.2f} GB/token, "
              f"{100 * r['fraction_of_copy_bandwidth']:.0f}% of copy bandwidth")
        del model, cache
        torch.cuda.empty_cache()
        if on_progress is not None:
            on_progress(partial)
    qm.GEMV_TILES.update(default_tiles)
    bf16 = results.get("bf16", {}).get("tokens_per_s")
    for r in results.values():
        if bf16 and "tokens_per_s" in r:
            r["speedup_vs_bf16"] = r["tokens_per_s"] / bf16
    return {"model": shape, "prompt_len": prompt_len, "new_tokens": new_tokens, "reps": reps,
            "decoders": results, "first_16_tokens": first_tokens}


def replace_in_blocks(model, make):
    """Swap every QuantLinear of the blocks for ``make(quant_linear)``."""
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, QuantLinear):
                setattr(module, child_name, make(child))


def run_smollm2(device, bandwidth, new_tokens=64, reps=3) -> dict:
    path = checkpoints.smollm2_path()
    if path is None:
        raise SystemExit("SmolLM2's GGUF file is missing: run `make models` (or python -m effml_lib.checkpoints fetch)")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    results = {}
    for name in ("dense", "w4-g32", "q4_1-kept"):
        model, tokenizer = checkpoints.load_gguf(path, dtype=dtype, device=device, quantized=name == "q4_1-kept")
        if name == "w4-g32":  # re-quantized from the dequantized weights, integer zero points
            quantize_model(model, 4, 32)
        prompt = torch.tensor([tokenizer.encode("The three most useful ideas in computer science are")], device=device)
        cache = StaticKVCache.for_model(model, batch_size=1, max_seq_len=prompt.shape[1] + new_tokens)
        decoding._compiled_decode_step = None
        compile = device.type == "cuda"
        r = decode_rate(lambda n: generate(model, prompt, n, cache=cache, compile=compile), new_tokens, device, reps)
        text = tokenizer.decode(generate(model, prompt, 24, cache=cache, compile=compile)[0, prompt.shape[1]:].tolist())
        r.update(dtype=str(dtype), compiled=compile, sample=text,
                 weight_bytes=sum(m.weight_bytes if isinstance(m, QuantLinear) else m.weight.numel() * m.weight.element_size()
                                  for m in model.modules() if isinstance(m, (QuantLinear, nn.Linear))))
        results[name] = r
        print(f"SmolLM2 {name}: {r['tokens_per_s']:.1f} tok/s ({dtype}, compiled={compile}): {text!r}")
    return results


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--parts", default=",".join(PARTS))
    p.add_argument("--device", default=None)
    p.add_argument("--out", default=None, help="results directory (default bench/results/<device>)")
    p.add_argument("--name", default="quant", help="result file stem")
    p.add_argument("--profile", action="store_true", help="decode: also profile each decoder's step (kernels per token)")
    args = p.parse_args(argv)
    parts = args.parts.split(",")
    if unknown := set(parts) - set(PARTS):
        raise SystemExit(f"unknown parts {sorted(unknown)}; choose from {PARTS}")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type != "cuda" and set(parts) - {"smollm2"}:
        raise SystemExit("only the smollm2 part runs without a GPU")
    if device.type == "cpu":
        torch.set_num_threads(1)
    env = env_info(device)
    bandwidth = copy_bandwidth(device, nbytes=2 * 2**30 if device.type == "cuda" else 256 * 2**20)
    print(f"{env.get('device_name')}: copy bandwidth {bandwidth / 1e12:.2f} TB/s (bytes read + written)")
    result = {"copy_bandwidth_bytes_per_s": bandwidth}
    runners = {"sweep": run_sweep, "sweep-gemm": run_sweep_gemm, "gemv": run_gemv, "batch": run_batch, "decode": run_decode, "smollm2": run_smollm2}
    out = Path(args.out) if args.out else ROOT / "bench" / "results" / device_slug(device)
    with torch.no_grad():
        for part in parts:
            start = time.perf_counter()
            if part == "decode":  # slow (a compilation per decoder): saved after each decoder
                def on_progress(partial):
                    save_result(out / f"{args.name}.json", {**result, "decode": partial}, device)
                result[part] = run_decode(device, bandwidth, on_progress=on_progress, profile=args.profile)
            else:
                result[part] = runners[part](device, bandwidth)
            print(f"[{part}: {time.perf_counter() - start:.0f} s]")
            path = save_result(out / f"{args.name}.json", result, device)  # after each part: a partial run still counts
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
