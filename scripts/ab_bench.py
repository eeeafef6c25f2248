"""Two or more artifacts timed in one process, alternating: an A/B of a graph change.

On a shared machine a figure moves with whatever else runs; runs of ``dbrx-aot bench`` minutes
apart compare the neighbours as much as the graphs. This loads every artifact's aoti runtime in
one process and times them in alternating rounds, so each round of each artifact sees the same
machine; it reports the median and best round.

    python scripts/ab_bench.py build/before build/after --prompt-len 128 --new-tokens 64 --rounds 8

A round: a fresh cache, the prompt's prefill (P tokens a call, logits at the last prompt token,
as generation runs it), then ``--new-tokens`` greedy decode steps. Random prompt ids (seeded);
batch-1 artifacts.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

import dbrx_aot


def one_round(rt, ids: torch.Tensor, new_tokens: int) -> tuple[float, float]:
    """(prefill seconds, decode seconds) of one prompt and its greedy continuation."""
    cache, P, T = rt.new_cache(), rt.prefill_chunk, ids.shape[1]
    start = time.perf_counter()
    for c in range(0, T, P):
        chunk = ids[:, c:c + P]
        n = chunk.shape[1]
        tokens = torch.nn.functional.pad(chunk, (0, P - n))
        logits = rt.prefill(tokens, torch.arange(c, c + P)[None], cache, torch.tensor([n - 1]))
    prefill = time.perf_counter() - start
    token = logits[:, -1].argmax(-1, keepdim=True)
    start = time.perf_counter()
    for i in range(new_tokens):
        logits = rt.decode(token, torch.tensor([[T + i]]), cache)
        token = logits[:, -1].argmax(-1, keepdim=True)
    return prefill, time.perf_counter() - start


def ab(paths: list[Path], prompt_len: int, new_tokens: int, rounds: int) -> dict:
    runtimes = {str(p): dbrx_aot.load_runtime(p, "aoti", progress=False, verify_checksums=False) for p in paths}
    for name, rt in runtimes.items():
        if rt.batch_size != 1 or prompt_len + new_tokens > rt.max_seq_len:
            raise dbrx_aot.DbrxAotError(f"{name}: batch {rt.batch_size}, {rt.max_seq_len} cache slots; expected "
                                        f"batch 1 and at least {prompt_len + new_tokens} slots")
    ids = torch.randint(0, 50000, (1, prompt_len), generator=torch.Generator().manual_seed(0))
    times: dict[str, list[tuple[float, float]]] = {name: [] for name in runtimes}
    for name, rt in runtimes.items():
        one_round(rt, ids, min(new_tokens, 2))  # warm-up
    for _ in range(rounds):
        for name, rt in runtimes.items():
            times[name].append(one_round(rt, ids, new_tokens))
    result = {}
    for name, ts in times.items():
        prefill = [prompt_len / p for p, _ in ts]
        decode = [new_tokens / d for _, d in ts] if new_tokens else [0.0]
        result[name] = {"prefill_tokens_per_s": {"median": statistics.median(prefill), "best": max(prefill)},
                        "decode_tokens_per_s": {"median": statistics.median(decode), "best": max(decode)}}
    return {"prompt_len": prompt_len, "new_tokens": new_tokens, "rounds": rounds,
            "threads": torch.get_num_threads(), "artifacts": result}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("artifacts", type=Path, nargs="+")
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    try:
        result = ab(args.artifacts, args.prompt_len, args.new_tokens, args.rounds)
    except dbrx_aot.DbrxAotError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    print(f"{args.rounds} alternating rounds: {args.prompt_len}-token prompt, {args.new_tokens} greedy steps, "
          f"{result['threads']} threads (median, best)")
    for name, r in result["artifacts"].items():
        p, d = r["prefill_tokens_per_s"], r["decode_tokens_per_s"]
        decode = f", decode {d['median']:.1f} ({d['best']:.1f}) tok/s" if args.new_tokens else ""
        print(f"{name}: prefill {p['median']:.0f} ({p['best']:.0f}) tok/s{decode}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
