"""The parity ladder every compiled runtime climbs against eager, on the same artifact's weights:
prefill, 32 cached decode steps, greedy continuations, long and ragged prompts, two caches."""

from __future__ import annotations

import pytest
import torch

import dbrx_aot
from conftest import TOLERANCE

STEPS = 32


def prompt(n: int, seed: int) -> list[int]:
    return torch.randint(0, 100000, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def check_prefill_and_decode(runtime, eager, atol: float) -> None:
    """Prefill logits (two chunks), then 32 cached decode steps fed eager's greedy tokens, and
    the greedy continuations of 32 tokens identical."""
    B, P = runtime.batch_size, runtime.prefill_chunk
    prompts = [prompt(P + 5, seed=b) for b in range(B)]
    c_rt, c_eager = runtime.new_cache(), eager.new_cache()
    for start in range(0, P + 5, P):
        tokens = torch.zeros(B, P, dtype=torch.int64)
        n = min(P, P + 5 - start)
        tokens[:, :n] = torch.tensor([p[start:start + n] for p in prompts])
        positions = torch.arange(start, start + P).expand(B, P)
        expected = eager.prefill(tokens, positions, c_eager)
        got = runtime.prefill(tokens, positions, c_rt)
        torch.testing.assert_close(got[:, :n], expected[:, :n], atol=atol, rtol=0)
        # The graph's own path (generation's): one position per row, chosen by logit_index.
        index = (torch.arange(B) * 3 + start) % n
        selected = runtime.prefill(tokens, positions, c_rt, index)
        assert selected.shape == (B, 1, eager.config.vocab_size)
        torch.testing.assert_close(selected[:, 0], expected[torch.arange(B), index], atol=atol, rtol=0)
        # Verification's path: R positions a row ([B, R]), the chunk once per column.
        pair = torch.stack([index, (index + 1) % n], dim=1)
        torch.testing.assert_close(runtime.prefill(tokens, positions, c_rt, pair),
                                   expected[torch.arange(B)[:, None], pair], atol=atol, rtol=0)
    nxt = expected[:, n - 1].argmax(-1)
    for step in range(STEPS):
        positions = torch.full((B, 1), P + 5 + step)
        expected = eager.decode(nxt[:, None], positions, c_eager)
        got = runtime.decode(nxt[:, None], positions, c_rt)
        torch.testing.assert_close(got, expected, atol=atol, rtol=0, msg=f"decode step {step}")
        nxt = expected[:, 0].argmax(-1)
    assert dbrx_aot.generate(runtime, prompts, max_new_tokens=STEPS, stop_ids=[]) == \
        dbrx_aot.generate(eager, prompts, max_new_tokens=STEPS, stop_ids=[])


def check_long_and_ragged_prompts(runtime, eager) -> None:
    """Prompts longer than P (several chunks) and rows of different lengths."""
    P = runtime.prefill_chunk
    prompts = [prompt(3 * P + 1, seed=10), prompt(2, seed=11)][: runtime.batch_size]
    assert dbrx_aot.generate(runtime, prompts, max_new_tokens=12, stop_ids=[]) == \
        dbrx_aot.generate(eager, prompts, max_new_tokens=12, stop_ids=[])


def check_two_caches(runtime) -> None:
    """Two conversations, interleaved on one loaded runtime, each equal to running it alone."""
    B = runtime.batch_size
    seqs = [prompt(6, seed=20), prompt(6, seed=21)]

    def feed(cache, seq, p):
        return runtime.decode(torch.tensor([[seq[p]]] * B), torch.full((B, 1), p), cache)

    alone = []
    for seq in seqs:
        cache = runtime.new_cache()
        alone.append([feed(cache, seq, p) for p in range(6)])
    caches = [runtime.new_cache(), runtime.new_cache()]
    interleaved = [[], []]
    for p in range(6):
        for i in (0, 1):
            interleaved[i].append(feed(caches[i], seqs[i], p))
    for i in (0, 1):
        for x, y in zip(alone[i], interleaved[i]):
            torch.testing.assert_close(x, y, atol=0, rtol=0)


RUNTIMES = ["aoti", "onnxruntime"]


def pair_loader(paths: dict):
    """get(runtime, key) -> (that runtime, eager), both on the artifact ``paths[key]``, loaded once."""
    cache = {}

    def get(runtime, key):
        if (runtime, key) not in cache:
            cache[runtime, key] = (dbrx_aot.load_runtime(paths[key], runtime, progress=False),
                                   dbrx_aot.load_runtime(paths[key], "eager", progress=False))
        return cache[runtime, key]

    return get


@pytest.fixture(scope="module")
def loaded(artifacts):
    """(runtime under test, eager) per (runtime, moe)."""
    return pair_loader(artifacts)


@pytest.mark.parametrize("moe", ["dense", "gather", "auto"])
@pytest.mark.parametrize("runtime", RUNTIMES)
def test_prefill_and_32_decode_steps_match_eager(loaded, runtime, moe):
    """For ONNX this is the check that catches a cache constant-folded into the graph."""
    check_prefill_and_decode(*loaded(runtime, moe), atol=TOLERANCE[(runtime, torch.float32)])


@pytest.mark.parametrize("moe", ["dense", "auto"])
@pytest.mark.parametrize("runtime", RUNTIMES)
def test_long_and_ragged_prompts(loaded, runtime, moe):
    check_long_and_ragged_prompts(*loaded(runtime, moe))


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_two_caches_do_not_interfere(loaded, runtime):
    check_two_caches(loaded(runtime, "auto")[0])


@pytest.fixture(scope="module")
def loaded_formats(weight_artifacts):
    """(runtime under test, eager) on the artifacts whose weights are int8 or bf16-stored."""
    return pair_loader(weight_artifacts)


@pytest.mark.parametrize("runtime, name", [("aoti", "int8"), ("onnxruntime", "int8"), ("aoti", "int8-b1"),
                                           ("aoti", "bfloat16"), ("onnxruntime", "bfloat16")])
def test_weight_formats_climb_the_same_ladder(loaded_formats, runtime, name):
    """The eager model on an int8 (or bf16-stored) artifact is the exact reference for its compiled
    graphs: the fp32 bar, prefill and 32 decode steps (dense prefill, gather decode, the row-dot form
    at batch 1)."""
    rt, eager = loaded_formats(runtime, name)
    check_prefill_and_decode(rt, eager, atol=TOLERANCE[(runtime, torch.float32)])
    if rt.batch_size > 1:
        check_long_and_ragged_prompts(rt, eager)
