"""One rank of a tensor-parallel run, launched by tests/test_tp.py (torchrun, or its own launcher).

    parity ART CKPT OTHER_CKPT OUT   aoti and eager TP shards of ART (and eager TP of OTHER_CKPT, as it
                                     is and quantised to int8)
                                     against the whole model in this process (verify.compare:
                                     chunked prefill, 32 decode steps, greedy over a ragged batch)
    dead ART OUT                     rank 1 exits after one step; rank 0 reports what it saw
    stall ART OUT                    rank 1 stops (SIGSTOP) after one step; the same
Rank 0 writes a JSON result to OUT.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path

import torch

from dbrx_aot import DbrxAotError, load_runtime
from dbrx_aot.checkpoint import load_model
from dbrx_aot.config import DbrxConfig
from dbrx_aot.manifest import Manifest
from dbrx_aot.runtimes.eager import EagerRuntime
from dbrx_aot.tokenizer import Tokenizer
from dbrx_aot.verify import compare

STEPS = 32


def whole_model(checkpoint: Path, batch_size: int, max_seq_len: int, prefill_chunk: int,
                weights: str = "same") -> EagerRuntime:
    """The unsharded eager model, in this rank's process (tp=1 whatever the world)."""
    config = DbrxConfig.from_file(checkpoint)
    model = load_model(checkpoint, config, torch.float32, "cpu", progress=False, weights_format=weights)
    return EagerRuntime(model, Tokenizer.from_checkpoint(checkpoint), batch_size=batch_size,
                        max_seq_len=max_seq_len, prefill_chunk=prefill_chunk)


def parity(artifact: Path, checkpoint: Path, other: Path, out: Path) -> None:
    m = Manifest.read(artifact)
    reference = whole_model(checkpoint, m.batch_size, m.max_seq_len, m.prefill_chunk)
    ids = [[(37 * i + 11) % 100000 for i in range(n)] for n in (5, 19, 12)]  # ragged, up to 3 chunks
    results = {}
    for name in ("aoti", "eager"):
        runtime = load_runtime(artifact, name, progress=False)
        results[name] = compare(runtime, reference, ids, STEPS)
        results[name]["cache"] = list(runtime.new_cache().k.shape)
    sharded = load_runtime(other, "eager", batch_size=2, max_seq_len=64, prefill_chunk=8, progress=False)
    small = [[(13 * i + 5) % 250 for i in range(n)] for n in (7, 17)]
    results["eager-other"] = compare(sharded, whole_model(other, 2, 64, 8), small, STEPS)
    results["eager-other"]["cache"] = list(sharded.new_cache().k.shape)
    int8 = load_runtime(other, "eager", batch_size=2, max_seq_len=64, prefill_chunk=8, weights="int8", progress=False)
    results["eager-other-int8"] = compare(int8, whole_model(other, 2, 64, 8, "int8"), small, STEPS)
    results["eager-other-int8"]["cache"] = list(int8.new_cache().k.shape)
    if torch.distributed.get_rank() == 0:
        out.write_text(json.dumps(results))


def failure(artifact: Path, out: Path, how: str) -> None:
    runtime = load_runtime(artifact, "aoti", progress=False)
    cache = runtime.new_cache()
    tokens = torch.zeros(runtime.batch_size, 1, dtype=torch.int64)
    runtime.decode(tokens, tokens, cache)
    if runtime.rank == 1:
        if how == "dead":
            os._exit(3)
        os.kill(os.getpid(), signal.SIGSTOP)
    start = time.perf_counter()
    try:
        for step in range(1, 20):
            runtime.decode(tokens, tokens + step, cache)
        result = {"error": None}
    except DbrxAotError as err:
        result = {"error": str(err)}
    result["seconds"] = time.perf_counter() - start
    out.write_text(json.dumps(result))
    os._exit(0)  # the process group cannot be torn down with a peer gone


if __name__ == "__main__":
    mode, *args = sys.argv[1:]
    if mode == "parity":
        parity(*map(Path, args))
    else:
        failure(Path(args[0]), Path(args[1]), mode)
