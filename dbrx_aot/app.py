"""What the CLI commands do, as typed library functions (the CLI only parses options)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable

from dbrx_aot.errors import DbrxAotError
from dbrx_aot.manifest import MANIFEST
from dbrx_aot.generate import generate
from dbrx_aot.runtimes import Runtime, load_runtime
from dbrx_aot.tokenizer import TextStream


def checksum_option(verify_checksums: bool) -> dict:
    """Pass the opt-out only when taken, so third-party runtimes need not know the option."""
    return {} if verify_checksums else {"verify_checksums": False}


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


def generate_text(path: Path, *, runtime: str, device: str, prompts: list[str], chat: bool = False,
                  system: str | None = None, max_new_tokens: int = 64, temperature: float = 0.0,
                  top_k: int | None = None, top_p: float | None = None, seed: int | None = None,
                  truncate: str = "error", write: Callable[[str], None] = print, verify_checksums: bool = True,
                  progress: bool = True) -> dict:
    """Load a runtime and generate from each prompt (one batch). A single prompt streams its text
    through ``write`` as it is generated; several are written when done, one block each."""
    # An artifact fixes the batch size; eager on a checkpoint has free shapes, so size it to the prompts.
    free_shapes = runtime == "eager" and not (Path(path) / MANIFEST).is_file()
    options = {"batch_size": len(prompts)} if free_shapes and prompts else {}
    rt = load_runtime(path, runtime=runtime, device=device, progress=progress, **options,
                      **checksum_option(verify_checksums))
    if not 1 <= len(prompts) <= rt.batch_size:
        raise DbrxAotError(f"{len(prompts)} prompts, but {path} runs batches of {rt.batch_size} "
                           "(--batch-size at export)")
    ids = [prompt_ids(rt, p, chat, system, truncate) for p in prompts]
    stream = TextStream(rt.tokenizer)
    stops = set(rt.tokenizer.eos_ids)

    def on_token(row: int, token: int) -> None:
        if len(prompts) == 1 and token not in stops:
            write(stream.push(token))

    reasons: dict[int, str] = {}
    start = time.perf_counter()
    out = generate(rt, ids, max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                   seed=seed, on_token=on_token, on_finish=reasons.__setitem__,
                   progress=progress and len(prompts) > 1)
    seconds = time.perf_counter() - start
    if len(prompts) == 1:
        write(stream.flush())
    else:
        for n, row in enumerate(out):
            write(f"[{n}] " + rt.tokenizer.decode([t for t in row if t not in stops]) + "\n")
    new = sum(len(row) for row in out)
    return {"prompt_tokens": [len(i) for i in ids], "new_tokens": new, "seconds": seconds,
            "tokens_per_s": new / seconds if seconds > 0 else float("inf"), "ids": out,
            "finish_reasons": [reasons[n] for n in range(len(out))], "max_seq_len": rt.max_seq_len}


def cache_full_note(rows: list[int], batch: int, max_seq_len: int) -> str:
    """What to tell the user when replies (``rows`` of a batch of ``batch``) stopped because the
    cache ran out of slots."""
    which = "the reply" if batch == 1 else "row(s) " + ", ".join(map(str, rows))
    return (f"note: {which} stopped early: the KV cache of {max_seq_len} positions is full (prompt + reply); "
            "export with a larger --max-seq-len for longer replies")
