"""The peer's side of a speed comparison: transformers' DbrxForCausalLM on a checkpoint, timed the
way ``dbrx-aot bench`` times a runtime (one prompt at batch 1, then greedy decode steps).

Issue 13 compares dbrx-aot's prefill and decode with the eager reference implementation: run this
and ``dbrx-aot bench`` back to back on the same machine. transformers is a test-only dependency
(never imported by the package), so this lives under scripts/.

    python scripts/peer_bench.py build/small --prompt-len 128 --new-tokens 64 [--json]

Prefill is measured as transformers' own generate prefills (``logits_to_keep=1``: lm_head at the
last position only) and, for reference, with every position's logits; decode feeds one token at a
time through its DynamicCache. ``--dtype`` float32 (default) or bfloat16; the machine's default
thread count.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch


def load(path: Path, dtype: torch.dtype):
    import transformers

    data = json.loads((path / "config.json").read_text())
    # transformers 5.x ignores attn_config.rope_theta without explicit rope_parameters (FACTS.md).
    data["rope_parameters"] = {"rope_type": "default", "rope_theta": data["attn_config"]["rope_theta"]}
    if data["attn_config"].get("clip_qkv") is None:
        data["attn_config"]["clip_qkv"] = 1e30  # transformers fails on None; the same math
    config = transformers.DbrxConfig(**{k: v for k, v in data.items() if k != "architectures"})
    return transformers.DbrxForCausalLM.from_pretrained(path, config=config, dtype=dtype).eval()


def best_of(seconds, repeats: int) -> float:
    seconds()  # warm-up
    return min(seconds() for _ in range(repeats))


def prompt_ids(model, prompt_len: int) -> torch.Tensor:
    return torch.randint(0, min(1000, model.config.vocab_size), (1, prompt_len),
                         generator=torch.Generator().manual_seed(0))        # [1, T]


@torch.inference_mode()
def prefill_seconds(model, ids: torch.Tensor, every_position: bool = False) -> float:
    """One prefill of the prompt without a cache: lm_head at the last position only, as generate
    prefills (or at every position)."""
    start = time.perf_counter()
    model(ids, use_cache=False, **({} if every_position else {"logits_to_keep": 1}))
    return time.perf_counter() - start


@torch.inference_mode()
def decode_seconds(model, ids: torch.Tensor, new_tokens: int) -> float:
    """``new_tokens`` greedy steps through a DynamicCache after the prompt (the steps timed)."""
    import transformers

    out = model(ids, past_key_values=transformers.DynamicCache(config=model.config), logits_to_keep=1)
    token = out.logits[:, -1:].argmax(-1)
    start = time.perf_counter()
    for _ in range(new_tokens):
        out = model(token, past_key_values=out.past_key_values)
        token = out.logits[:, -1:].argmax(-1)
    return time.perf_counter() - start


def name(model) -> str:
    import transformers

    return f"transformers {transformers.__version__} eager {str(model.dtype).removeprefix('torch.')}"


def measure(path: Path, prompt_len: int, new_tokens: int, repeats: int = 3, dtype: str = "float32") -> dict:
    model = load(path, getattr(torch, dtype))
    ids = prompt_ids(model, prompt_len)
    last = best_of(lambda: prefill_seconds(model, ids), repeats)
    every = best_of(lambda: prefill_seconds(model, ids, every_position=True), repeats)
    decode_s = best_of(lambda: decode_seconds(model, ids, new_tokens), repeats)
    return {"runtime": name(model), "dtype": dtype, "prompt_len": prompt_len,
            "new_tokens": new_tokens, "threads": torch.get_num_threads(),
            "prefill_tokens_per_s": prompt_len / last, "prefill_all_logits_tokens_per_s": prompt_len / every,
            "decode_tokens_per_s": new_tokens / decode_s}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3, help="best of N timed runs of each")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    result = measure(args.checkpoint, args.prompt_len, args.new_tokens, args.repeats, args.dtype)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(f"{result['runtime']}: prefill {result['prefill_tokens_per_s']:.0f} tok/s (logits_to_keep=1), "
              f"{result['prefill_all_logits_tokens_per_s']:.0f} tok/s (every position's logits); "
              f"decode {result['decode_tokens_per_s']:.1f} tok/s ({args.prompt_len}-token prompt, "
              f"{args.new_tokens} steps, {result['threads']} threads)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
