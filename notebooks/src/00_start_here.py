# %% [markdown]
# # 00 · Start here: check your setup and meet the course model
#
# This notebook checks that `effml_lib` works on your machine, then introduces the model every module
# builds on: **effml-tiny**, a 17 M-parameter Llama-style decoder that the course trained on the Python
# standard library's own source code. It ends with a first measurement — how fast the model writes code on
# your device — and compares that with a 7-billion-parameter model on an H100.
#
# Runs in well under a minute on a laptop CPU.

# %% shared="colab_setup"

# %% tags=["parameters"]
# parameters: sizes for the measurement below (raise them on a GPU)
contexts = [16, 64, 256, 1024]   # prompt lengths (tokens) for the decode-speed sweep
new_tokens = 32                  # tokens generated per timing
reps = 4                         # repetitions per point (the fastest is reported)

# %% shared="notebook_setup"

# %% [markdown]
# ## Your machine

# %%
from effml_lib.device import get_device
from effml_lib.measure import env_info

device = get_device()
info = env_info(device)
for key in ("device_name", "python", "torch", "torch_threads", "triton", "cuda"):
    print(f"{key:12s} {info[key]}")

# %% [markdown]
# ## The course model
#
# `checkpoints.pretrained` loads weights shipped inside the package: nothing is downloaded. The tokenizer is
# the course's own byte-level BPE with 4096 tokens.

# %%
from effml_lib.checkpoints import pretrained, pretrained_info
from effml_lib.tokenizer import load_tokenizer

tok = load_tokenizer()
model = pretrained("effml-tiny", device=device)
cfg = model.config
print(f"{model.num_parameters() / 1e6:.1f} M parameters: {cfg.n_layers} layers, dim {cfg.dim}, "
      f"{cfg.n_heads} heads of {cfg.head_dim}, vocabulary {cfg.vocab_size}")
training = pretrained_info("effml-tiny")["training"]
print(f"held-out perplexity {training['heldout_perplexity']:.2f} on {training['heldout_tokens']:,} tokens of library code")

# %% [markdown]
# A tokenizer turns text into integer ids. Code compresses to about 3.4 bytes per token: common
# identifiers such as ` self` or `return` are single tokens.

# %%
text = "    def __init__(self, name):\n        self.name = name\n"
ids = tok.encode(text)
print(len(text), "characters ->", len(ids), "tokens")
print([tok.decode([i]) for i in ids])

# %% [markdown]
# ## Let it write some Python
#
# Greedy decoding always takes the most likely token and, in small models, soon repeats itself; sampling
# with a temperature and top-k keeps the text varied. The seed makes the sample reproducible.

# %%
from effml_lib.decoding import generate

prompt = tok.encode("class Stack:\n    def")
greedy = generate(model, prompt, max_new_tokens=60)
sampled = generate(model, prompt, max_new_tokens=60, temperature=0.8, top_k=40, seed=0)
print("--- greedy ---\n" + tok.decode(greedy[0].tolist()))
print("--- sampled (T=0.8, top-k 40) ---\n" + tok.decode(sampled[0].tolist()))

# %% [markdown]
# ## A first measurement: decode speed on your device
#
# Each new token needs one forward pass. With a KV cache (module 03) that pass reads every weight once,
# plus the cached keys and values of all earlier tokens. We time generating a fixed number of tokens after
# prompts of growing length.

# %% shared="fastest_in_turns"

# %%
import pandas as pd
from tqdm import tqdm

rows = []
g = torch.Generator().manual_seed(0)
for context in tqdm(contexts, desc="context lengths"):
    prompt = torch.randint(0, cfg.vocab_size, (1, context), generator=g).to(device)
    # generating new_tokens minus generating 1 (the prefill) leaves new_tokens - 1 decode steps
    ms = fastest_in_turns({"full": lambda: generate(model, prompt, new_tokens),
                           "prefill": lambda: generate(model, prompt, 1)}, rounds=reps, warmup=1)
    per_token_ms = (ms["full"] - ms["prefill"]) / (new_tokens - 1)
    rows.append({"context": context, "ms_per_token": per_token_ms, "tokens_per_s": 1e3 / per_token_ms})
speed = pd.DataFrame(rows)
speed.round(2)

# %%
import matplotlib.pyplot as plt

fig, ax = plt.subplots(figsize=(6, 3.5))
ax.plot(speed["context"], speed["tokens_per_s"], marker="o")
ax.set_xscale("log", base=2)
ax.set_xticks(speed["context"], [str(c) for c in speed["context"]])
ax.minorticks_off()
ax.set_xlabel("prompt length (tokens)")
ax.set_ylabel("decode speed (tokens/s)")
ax.set_title(f"effml-tiny, batch 1, on {info['device_name']}")
ax.set_ylim(bottom=0)
plt.show()
first, last = speed.iloc[0], speed.iloc[-1]
print(f"{first['tokens_per_s']:.0f} tokens/s after {first['context']:.0f} prompt tokens, "
      f"{last['tokens_per_s']:.0f} after {last['context']:.0f} ({last['tokens_per_s'] / first['tokens_per_s'] - 1:+.0%})")

# %% [markdown]
# The plot shows generation speed after prompts of growing length. Each step reads the weights
# (69 MB in float32) plus the cache: 2 (K and V) × 8 layers × 384 values × 4 bytes = 24.6 KB per cached
# token, so 25 MB more at 1024 tokens, a third more bytes than the weights alone. That is why the speed
# holds for short prompts and drops at the longest one (the line under the plot). Module 03 measures
# where the time goes as contexts grow.

# %% [markdown]
# ## The same question on an H100, at 7 billion parameters
#
# `bench/decode.py` decodes with a Llama-2-7B-shaped model on an NVIDIA H100. At batch 1 each step must read
# all 13.2 GB of weights, so the memory bandwidth sets a speed limit; the benchmark measures that bandwidth
# in the same run (a device-to-device copy) and reports how close each decoder gets.

# %%
from effml_lib.measure import load_result

h100 = load_result("nvidia-h100-80gb-hbm3", "decode")["results"]  # bench/results/..., shipped with the package
table = pd.DataFrame([{"decoder": name, "tokens/s": r["tokens_per_s"], "% of copy bandwidth": 100 * r["fraction_of_copy_bandwidth"]}
                      for name, r in h100["decoders"].items()])
bound = h100["copy_bandwidth_bytes_per_s"] / h100["decoders"]["ours-compiled"]["bytes_per_token"]
print(f"bandwidth bound: {bound:.0f} tokens/s")
table.round(1)

# %%
fig, ax = plt.subplots(figsize=(6, 3))
ax.barh(table["decoder"], table["tokens/s"])
ax.axvline(bound, color="tab:red", linestyle="--", label="bandwidth bound")
ax.set_xlabel("decode speed (tokens/s, batch 1)")
ax.set_ylabel("decoder")
ax.set_title("Llama-2-7B shape, bf16, NVIDIA H100 (measured by bench/decode.py)")
ax.legend(loc="lower right")
plt.show()

# %% [markdown]
# The bars are tokens per second of three decoders running the same weights; the dashed line is the
# bandwidth limit. Eager PyTorch (ours or Hugging Face's) launches hundreds of small GPU kernels per token
# from Python and leaves the GPU idle between them; compiling the decode step and replaying it as one CUDA
# graph gets to three quarters of it or more. The rest of the course is about moving that limit: fewer bytes per
# token (GQA, quantization), more tokens per read (batching, speculative decoding), less memory per sequence
# (PagedAttention).
