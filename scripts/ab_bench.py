"""Two or more artifacts timed in one process, alternating: an A/B of a graph change.

On a shared machine a figure moves with whatever else runs; runs of ``dbrx-aot bench`` minutes
apart compare the neighbours as much as the graphs. This loads every artifact's aoti runtime
(``--runtime onnxruntime``: its ONNX graphs) in one process and times them in alternating rounds,
so each round of each artifact sees the same machine; it reports the median and best round.
``--runtime`` repeated (``--runtime aoti --runtime onnxruntime``) puts each artifact's graphs on
every named runtime into the same rounds.

    python scripts/ab_bench.py build/before build/after --prompt-len 128 --new-tokens 64 --rounds 8

A round is one ``dbrx_aot.bench.bench_runtime`` call with one timed prefill: the prompt's
prefill (P tokens a call, logits at the last prompt token, as generation runs it), then
``--new-tokens`` greedy decode steps, after its own warm-up. Batch-1 artifacts.
``--transformers CHECKPOINT`` adds the peer (transformers' DbrxForCausalLM, as
scripts/peer_bench.py times it: one-shot prefill with ``logits_to_keep=1``) to the same rounds.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import sys
from functools import partial
from pathlib import Path

import torch

import dbrx_aot
from dbrx_aot.bench import bench_runtime


def transformers_round(checkpoint: Path, dtype: str, prompt_len: int, new_tokens: int):
    """The peer as one more contender: transformers' DbrxForCausalLM on the artifact's checkpoint
    (scripts/peer_bench.py), a round being one ``logits_to_keep=1`` prefill and the greedy steps."""
    spec = importlib.util.spec_from_file_location("peer_bench", Path(__file__).with_name("peer_bench.py"))
    peer = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(peer)
    model = peer.load(checkpoint, getattr(torch, dtype))
    ids = peer.prompt_ids(model, prompt_len)

    def one_round() -> dict:
        return {"prefill_tokens_per_s": prompt_len / peer.prefill_seconds(model, ids),
                "decode_tokens_per_s": new_tokens / peer.decode_seconds(model, ids, new_tokens)}

    one_round()  # warm-up
    return peer.name(model), one_round


def ab(paths: list[Path], prompt_len: int, new_tokens: int, rounds: int, transformers: Path | None = None,
       transformers_dtype: str = "float32", runtimes: tuple[str, ...] = ("aoti",)) -> dict:
    if prompt_len < 1 or new_tokens < 1:
        raise dbrx_aot.DbrxAotError(f"--prompt-len {prompt_len}, --new-tokens {new_tokens}: expected at least 1 each")
    loaded = {}
    for path in paths:
        for runtime in runtimes:
            name = f"{path} {runtime}" if len(runtimes) > 1 else str(path)
            loaded[name] = dbrx_aot.load_runtime(path, runtime, progress=False, verify_checksums=False)
    for name, rt in loaded.items():
        if rt.batch_size != 1 or prompt_len + new_tokens > rt.max_seq_len:
            raise dbrx_aot.DbrxAotError(f"{name}: batch {rt.batch_size}, {rt.max_seq_len} cache slots; expected "
                                        f"batch 1 and at least {prompt_len + new_tokens} slots")
    contenders = {name: partial(bench_runtime, rt, prompt_len, new_tokens, repeats=1) for name, rt in loaded.items()}
    peer = None
    if transformers is not None:
        peer, one_round = transformers_round(transformers, transformers_dtype, prompt_len, new_tokens)
        contenders[peer] = one_round
    runs: dict[str, list[dict]] = {name: [] for name in contenders}
    for _ in range(rounds):
        for name, one_round in contenders.items():
            runs[name].append(one_round())
    result = {}
    for name, rs in runs.items():
        result[name] = {key: {"median": statistics.median(r[key] for r in rs), "best": max(r[key] for r in rs)}
                        for key in ("prefill_tokens_per_s", "decode_tokens_per_s")}
    return {"runtimes": list(runtimes), "prompt_len": prompt_len, "new_tokens": new_tokens, "rounds": rounds,
            "threads": torch.get_num_threads(), "artifacts": result, "peer": peer}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("artifacts", type=Path, nargs="+")
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--runtime", choices=["aoti", "onnxruntime"], action="append",
                        help="the runtime every artifact runs on (default aoti); repeat for several")
    parser.add_argument("--transformers", type=Path, metavar="CHECKPOINT",
                        help="also time transformers' DbrxForCausalLM on this checkpoint, in the same rounds")
    parser.add_argument("--transformers-dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    try:
        result = ab(args.artifacts, args.prompt_len, args.new_tokens, args.rounds, args.transformers,
                    args.transformers_dtype, tuple(dict.fromkeys(args.runtime or ["aoti"])))
    except dbrx_aot.DbrxAotError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    print(f"{args.rounds} alternating rounds on {', '.join(result['runtimes'])}: {args.prompt_len}-token prompt, "
          f"{args.new_tokens} greedy steps, {result['threads']} threads (median, best)")
    peer = result["artifacts"].get(result["peer"])
    for name, r in result["artifacts"].items():
        p, d = r["prefill_tokens_per_s"], r["decode_tokens_per_s"]
        vs = "" if peer is None or r is peer else (
            f"; medians {p['median'] / peer['prefill_tokens_per_s']['median']:.2f}x and "
            f"{d['median'] / peer['decode_tokens_per_s']['median']:.2f}x transformers'")
        print(f"{name}: prefill {p['median']:.0f} ({p['best']:.0f}) tok/s, decode {d['median']:.1f} "
              f"({d['best']:.1f}) tok/s{vs}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
