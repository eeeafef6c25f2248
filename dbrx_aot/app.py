"""What the CLI commands do, as typed library functions (the CLI only parses options)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable

from dbrx_aot.errors import DbrxAotError
from dbrx_aot.generate import generate
from dbrx_aot.runtimes import Runtime, load_runtime
from dbrx_aot.tokenizer import TextStream


def prompt_ids(runtime: Runtime, prompt: str, chat: bool, system: str | None, truncate: str,
               reserve: int = 1) -> list[int]:
    """Tokenize a prompt (optionally through the chat template) and apply the truncation policy."""
    tok = runtime.tokenizer
    if chat:
        messages = ([{"role": "system", "content": system}] if system is not None else [])
        ids = tok.encode_chat(messages + [{"role": "user", "content": prompt}])
    else:
        ids = tok.encode(prompt)
    if not ids:
        raise DbrxAotError("--prompt is empty, expected some text")
    room = runtime.max_seq_len - reserve
    if len(ids) > room:
        if truncate != "left":
            raise DbrxAotError(f"--prompt is {len(ids)} tokens, longer than the cache allows ({room} + {reserve} "
                               f"to generate; --max-seq-len {runtime.max_seq_len}); shorten it or pass --truncate left")
        ids = ids[-room:]
    return ids


def generate_text(path: Path, *, runtime: str, device: str, prompt: str, chat: bool = False,
                  system: str | None = None, max_new_tokens: int = 64, temperature: float = 0.0,
                  top_k: int | None = None, top_p: float | None = None, seed: int | None = None,
                  truncate: str = "error", write: Callable[[str], None] = print, progress: bool = True) -> dict:
    """Load a runtime, generate from one prompt, stream the text through ``write``; return timings."""
    rt = load_runtime(path, runtime=runtime, device=device, progress=progress)
    ids = prompt_ids(rt, prompt, chat, system, truncate)
    stream = TextStream(rt.tokenizer)
    stops = set(rt.tokenizer.eos_ids)

    def on_token(row: int, token: int) -> None:
        if token not in stops:
            write(stream.push(token))

    start = time.perf_counter()
    out = generate(rt, [ids], max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                   seed=seed, on_token=on_token)
    seconds = time.perf_counter() - start
    write(stream.flush())
    return {"prompt_tokens": len(ids), "new_tokens": len(out[0]), "seconds": seconds,
            "tokens_per_s": len(out[0]) / seconds if seconds > 0 else float("inf"), "ids": out[0]}
