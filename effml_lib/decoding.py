"""Text generation with the static KV cache: greedy, temperature, top-k, top-p; seeded.

Decoding runs in two phases:
  prefill  the whole prompt in one forward pass, filling the cache;          (B, T_prompt)
  decode   one token per step, each attending to everything cached so far.   (B, 1)

``compile=True`` wraps the decode step in ``torch.compile(mode="reduce-overhead")``: the step runs
over the whole preallocated cache under a mask, so every step has the same shapes and the compiled
kernels replay as one CUDA graph, removing the per-kernel launch overhead that dominates small-batch
decoding.
"""

from __future__ import annotations

import torch

from .kvcache import StaticKVCache


def _check_sampling(temperature, top_k, top_p) -> None:
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or temperature < 0:
        raise ValueError(f"temperature must be a number >= 0, got {temperature!r}")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k <= 0):
        raise ValueError(f"top_k must be a positive int or None, got {top_k!r}")
    if top_p is not None and (isinstance(top_p, bool) or not isinstance(top_p, (int, float)) or not 0 < top_p <= 1):
        raise ValueError(f"top_p must be a number in (0, 1] or None, got {top_p!r}")


def sample_next(
    logits: torch.Tensor,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """logits (B, V) -> next token ids (B,). temperature 0 is greedy (argmax)."""
    _check_sampling(temperature, top_k, top_p)
    if logits.dim() != 2:
        raise ValueError(f"logits must have shape (B, V), got {tuple(logits.shape)}")
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k is not None:
        kth_best = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth_best, float("-inf"))
    probs = torch.softmax(logits, dim=-1)  # (B, V)
    if top_p is not None:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs  # probability of strictly better tokens
        sorted_probs = sorted_probs.masked_fill(mass_before >= top_p, 0.0)  # the top token always stays
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_probs)
    # multinomial renormalises; draw on the CPU when the generator lives there
    gen_device = generator.device if generator is not None else probs.device
    return torch.multinomial(probs.to(gen_device), 1, generator=generator).squeeze(-1).to(logits.device)


def _as_prompt(prompt, device) -> torch.Tensor:
    if isinstance(prompt, (list, tuple)):
        try:
            prompt = torch.tensor(prompt)  # no dtype: a list of floats must fail below, not be truncated
        except (TypeError, ValueError) as e:
            raise TypeError(f"prompt must be a list of int token ids (or a list of equal-length lists): {e}") from None
    if not isinstance(prompt, torch.Tensor):
        raise TypeError(f"prompt must be a list of token ids or a (B, T) tensor, got {type(prompt).__name__}")
    if prompt.is_floating_point() or prompt.is_complex() or prompt.dtype == torch.bool:
        raise TypeError(f"prompt must hold integer token ids, got dtype {prompt.dtype}")
    if prompt.dim() == 1:
        prompt = prompt.unsqueeze(0)
    if prompt.dim() != 2 or prompt.shape[1] == 0:
        raise ValueError(f"prompt must have shape (T,) or (B, T) with T >= 1, got {tuple(prompt.shape)}")
    return prompt.to(device)


def decode_step(model, cache: StaticKVCache, token: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """One decode step over the whole static cache: token (B, 1), pos (1,) int tensor -> logits (B, V)."""
    return model.forward_unchecked(token, cache, pos)[:, -1]


_compiled_decode_step = None


def compiled_decode_step():
    """``decode_step`` under torch.compile, created once per process so every generate() call (same
    model and cache shapes) reuses the compiled kernels and the recorded CUDA graph.

    The options are those of mode="reduce-overhead" (CUDA graphs) plus coordinate-descent tuning of
    the matrix-vector kernels inductor generates for batch-1 decode: measured 129 -> 146 tok/s for a
    Llama-2-7B shape on an H100 (bench/NOTES.md). Passed per call, they change no global setting.
    """
    global _compiled_decode_step
    if _compiled_decode_step is None:
        options = {"triton.cudagraphs": True, "coordinate_descent_tuning": True}
        _compiled_decode_step = torch.compile(decode_step, fullgraph=True, options=options)
    return _compiled_decode_step


@torch.no_grad()
def generate(
    model,
    prompt,
    max_new_tokens: int,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int | None = None,
    eos_id: int | None = None,
    use_cache: bool = True,
    compile: bool = False,
    cache: StaticKVCache | None = None,
) -> torch.Tensor:
    """Continue ``prompt`` ((T,) or (B, T) token ids) by ``max_new_tokens``; returns (B, T + new).

    Sequences that emit ``eos_id`` are padded with it afterwards; generation stops early when all did.
    ``use_cache=False`` recomputes the whole sequence every step (what module 03 measures against).
    ``seed`` makes sampling reproducible on any device. With ``compile=True``, pass the same ``cache``
    to every call: a new cache has new addresses, which costs a new CUDA-graph recording.
    """
    if not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be a non-negative int, got {max_new_tokens!r}")
    _check_sampling(temperature, top_k, top_p)
    vocab_size = model.config.vocab_size
    if eos_id is not None and (isinstance(eos_id, bool) or not isinstance(eos_id, int) or not 0 <= eos_id < vocab_size):
        raise ValueError(f"eos_id must be a token id in [0, {vocab_size}) or None, got {eos_id!r}")
    if not use_cache and (compile or cache is not None):
        raise ValueError("compile=True and cache= need use_cache=True")
    device = model.tok_embeddings.weight.device
    tokens = _as_prompt(prompt, device)
    batch, prompt_len = tokens.shape
    total = prompt_len + max_new_tokens
    if total > model.config.max_seq_len:
        raise ValueError(
            f"prompt ({prompt_len}) + max_new_tokens ({max_new_tokens}) = {total} exceeds max_seq_len "
            f"{model.config.max_seq_len}"
        )
    model._check_tokens(tokens)
    generator = None
    if seed is not None:
        generator = torch.Generator(device="cpu").manual_seed(seed)
    if max_new_tokens == 0:
        return tokens

    out = torch.empty(batch, total, dtype=torch.long, device=device)
    out[:, :prompt_len] = tokens
    finished = torch.zeros(batch, dtype=torch.bool, device=device)

    def emit(logits, t):
        nonlocal finished
        nxt = sample_next(logits, temperature, top_k, top_p, generator)
        if eos_id is not None:
            nxt = torch.where(finished, torch.full_like(nxt, eos_id), nxt)
            finished = finished | (nxt == eos_id)
        out[:, t] = nxt

    if not use_cache:
        for t in range(prompt_len, total):
            emit(model.forward_unchecked(out[:, :t])[:, -1], t)
            if eos_id is not None and bool(finished.all()):
                return out[:, : t + 1]
        return out

    if cache is None:
        cache = StaticKVCache.for_model(model, batch, max_seq_len=total)
    else:
        model._check_positions(tokens, cache, 0)
        if cache.max_seq_len < total:
            raise ValueError(f"cache max_seq_len {cache.max_seq_len} < prompt + max_new_tokens = {total}")

    emit(model.forward_unchecked(tokens, cache, 0)[:, -1], prompt_len)  # prefill
    if compile:
        step = compiled_decode_step()
        pos = torch.empty(1, dtype=torch.long, device=device)
        token = torch.empty(batch, 1, dtype=torch.long, device=device)
    for t in range(prompt_len + 1, total):
        if compile:
            # fixed-address inputs, position as a tensor: one graph serves every step
            pos.fill_(t - 1)
            token.copy_(out[:, t - 1 : t])
            logits = step(model, cache, token, pos)
        else:
            logits = model.forward_unchecked(out[:, t - 1 : t], cache, t - 1)[:, -1]  # sees t entries
        emit(logits, t)
        if eos_id is not None and bool(finished.all()):
            return out[:, : t + 1]
    return out
