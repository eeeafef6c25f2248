"""The generation loop, written once above the runtime protocol.

Prompts are token id lists of any lengths (up to the runtime's batch size B). They are prefilled
in chunks of P tokens (padding after each row's last token), then decoded one token per call.
Logits stay on the runtime's device; sampling runs there; only the B chosen ids come back to the
host each step (to check stop ids and stream).
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
from tqdm.auto import tqdm

from dbrx_aot.errors import DbrxAotError
from dbrx_aot.runtimes import PAD_TOKEN, KVCache, Runtime, prefill_chunks
from dbrx_aot.tp import common_seed


def sample(logits: torch.Tensor, temperature: float = 0.0, top_k: int | None = None,
           top_p: float | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
    """logits [B, V] -> ids [B]. temperature 0 is greedy (argmax)."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        # Drop a token when the tokens before it already hold top_p of the mass.
        drop = (probs.cumsum(dim=-1) - probs) > top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.empty_like(logits).scatter_(-1, order, sorted_logits)
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs, 1, generator=generator)[:, 0]


def check_sampling(temperature: float, top_k: int | None, top_p: float | None, max_new_tokens: int) -> None:
    if not temperature >= 0:
        raise DbrxAotError(f"--temperature {temperature}: expected >= 0")
    if top_k is not None and top_k < 1:
        raise DbrxAotError(f"--top-k {top_k}: expected a positive integer")
    if top_p is not None and not 0 < top_p <= 1:
        raise DbrxAotError(f"--top-p {top_p}: expected a value in (0, 1]")
    if max_new_tokens < 1:
        raise DbrxAotError(f"--max-new-tokens {max_new_tokens}: expected a positive integer")


@torch.inference_mode()
def generate(runtime: Runtime, prompts: Sequence[Sequence[int]], *, max_new_tokens: int,
             temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None,
             seed: int | None = None, stop_ids: Sequence[int] | None = None,
             cache: KVCache | None = None, offsets: Sequence[int] | None = None,
             on_token: Callable[[int, int], None] | None = None,
             on_finish: Callable[[int, str], None] | None = None, progress: bool = False) -> list[list[int]]:
    """Each row's new ids (a stop id that ended a row is included as its last id).

    stop_ids=None means the tokenizer's eos set; [] never stops early. ``cache`` and ``offsets``
    continue a conversation: row b's prompt goes to positions offsets[b]... of that cache. After
    the call the cache holds each prompt and every returned id but the last (never fed back).
    ``on_token(row, id)`` is called as each id is chosen; ``on_finish(row, reason)`` once per row
    when it ends, with the reason: ``stop`` (a stop id), ``length`` (max_new_tokens) or
    ``cache`` (the cache is full: no slot left to feed the last id).
    """
    B, S, P = runtime.batch_size, runtime.max_seq_len, runtime.prefill_chunk
    V = runtime.config.vocab_size
    check_sampling(temperature, top_k, top_p, max_new_tokens)
    n = len(prompts)
    if n and not all(isinstance(p, (list, tuple)) or (isinstance(p, torch.Tensor) and p.dim() == 1)
                     for p in prompts):
        raise DbrxAotError("prompts: expected a list of token-id lists, one per row (e.g. [[15339, 1917]]), "
                           f"got {type(prompts[0]).__name__} items")
    if not 1 <= n <= B:
        raise DbrxAotError(f"{n} prompts, expected 1 to {B} (the batch size this runtime was built for)")
    offsets = list(offsets) if offsets is not None else [0] * n
    if len(offsets) != n:
        raise DbrxAotError(f"offsets: {len(offsets)} values for {n} prompts")
    prompts = [[int(t) for t in p] for p in prompts]
    for row, (prompt, offset) in enumerate(zip(prompts, offsets)):
        if len(prompt) == 0:
            raise DbrxAotError(f"prompt {row} is empty, expected at least one token")
        if not all(0 <= t < V for t in prompt):
            raise DbrxAotError(f"prompt {row} holds a token id outside [0, {V})")
        if offset + len(prompt) > S:
            raise DbrxAotError(f"prompt {row}: {offset + len(prompt)} tokens do not fit the cache of "
                               f"{S} positions (--max-seq-len at export; shorten the prompt)")
    stop = set(runtime.tokenizer.eos_ids if stop_ids is None else stop_ids)
    cache = cache if cache is not None else runtime.new_cache()
    device = runtime.device
    generator = torch.Generator(device=device)
    if getattr(runtime, "tp", 1) > 1:  # every rank must sample the same ids
        seed = common_seed(seed)
    if seed is not None:
        generator.manual_seed(seed)
    else:
        generator.seed()
    rows = [list(p) for p in prompts] + [[PAD_TOKEN]] * (B - n)  # unused rows run a one-token dummy
    offs = offsets + [0] * (B - n)
    lengths = [len(r) for r in rows]

    # Prefill, chunk by chunk; each row's next-token logits come from the chunk holding its last
    # token, the only position whose logits the prefill graph computes (logit_index).
    last = torch.empty(B, V, device=device, dtype=torch.float32)
    for start, tokens, positions in prefill_chunks(rows, P, S, offs):
        ends = [lengths[b] - 1 - start for b in range(B)]                # each row's last token, in this chunk
        logits = runtime.prefill(tokens, positions, cache, torch.tensor([e if 0 <= e < P else 0 for e in ends]))
        for b in range(B):
            if 0 <= ends[b] < P:
                last[b] = logits[b, 0].float()

    out: list[list[int]] = [[] for _ in range(n)]
    done = [b >= n for b in range(B)]
    pos = [offs[b] + lengths[b] for b in range(B)]  # where each row's next id will be fed
    nxt = sample(last, temperature, top_k, top_p, generator)
    bar = tqdm(total=max_new_tokens, desc="generating", unit="tok", disable=not progress)
    for step in range(max_new_tokens):
        ids = nxt.tolist()
        for b in range(n):
            if done[b]:
                continue
            out[b].append(ids[b])
            if on_token is not None:
                on_token(b, ids[b])
            reason = ("stop" if ids[b] in stop else "cache" if pos[b] >= S  # no cache slot left to feed it
                      else "length" if step == max_new_tokens - 1 else None)
            if reason is not None:
                done[b] = True
                if on_finish is not None:
                    on_finish(b, reason)
        bar.update()
        if all(done) or step == max_new_tokens - 1:
            break
        positions = torch.tensor([[min(p, S - 1)] for p in pos], dtype=torch.int64)
        logits = runtime.decode(nxt[:, None], positions, cache)
        pos = [p + 1 for p in pos]
        nxt = sample(logits[:, 0].float(), temperature, top_k, top_p, generator)
    bar.close()
    return out
