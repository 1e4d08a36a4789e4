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


def sample_next(
    logits: torch.Tensor,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """logits (B, V) -> next token ids (B,). temperature 0 is greedy (argmax)."""
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k is not None:
        if not isinstance(top_k, int) or top_k <= 0:
            raise ValueError(f"top_k must be a positive int, got {top_k!r}")
        kth_best = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth_best, float("-inf"))
    probs = torch.softmax(logits, dim=-1)  # (B, V)
    if top_p is not None:
        if not 0 < top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {top_p!r}")
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs  # probability of strictly better tokens
        sorted_probs = sorted_probs.masked_fill(mass_before >= top_p, 0.0)  # the top token always stays
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_probs)
    # multinomial renormalises; draw on the CPU when the generator lives there
    gen_device = generator.device if generator is not None else probs.device
    return torch.multinomial(probs.to(gen_device), 1, generator=generator).squeeze(-1).to(logits.device)


def _as_prompt(prompt, device) -> torch.Tensor:
    if isinstance(prompt, (list, tuple)):
        prompt = torch.tensor(prompt, dtype=torch.long)
    if not isinstance(prompt, torch.Tensor):
        raise TypeError(f"prompt must be a list of token ids or a (B, T) tensor, got {type(prompt).__name__}")
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
    model and cache shapes) reuses the compiled kernels and the recorded CUDA graph."""
    global _compiled_decode_step
    if _compiled_decode_step is None:
        import torch._inductor.config as inductor_config

        # Tune the block sizes of the matrix-vector kernels inductor generates for batch-1 decode:
        # measured 129 -> 146 tok/s for a Llama-2-7B shape on an H100 (bench/decode_variants.py).
        inductor_config.coordinate_descent_tuning = True
        _compiled_decode_step = torch.compile(decode_step, mode="reduce-overhead", fullgraph=True)
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
    ``seed`` makes sampling reproducible on any device.
    """
    if not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be a non-negative int, got {max_new_tokens!r}")
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
