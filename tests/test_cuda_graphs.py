"""CUDA graphs for decode, on CPU: everything but the capture itself.

``replay_eagerly`` stands in for ``capture_cuda_graph`` with a graph's contract: the output lives
in one tensor that every replay overwrites, and a replay reruns the captured function on whatever
its captured tensors hold then. A runtime that captured the caller's tokens instead of the static
buffers, shared one graph between two caches, or returned the graph's own output would fail here.
"""

from __future__ import annotations

import pytest
import torch

import dbrx_aot
from conftest import TOLERANCE
from dbrx_aot.bench import bench
from dbrx_aot.errors import DbrxAotError
from dbrx_aot.runtimes.cuda_graphs import DecodeGraphs
from test_ladder import check_long_and_ragged_prompts, check_prefill_and_decode, check_two_caches


def replay_eagerly(fn):
    out = fn()
    return (lambda: out.copy_(fn())), out


@pytest.fixture(scope="module")
def graphed(artifacts):
    """(aoti runtime decoding through DecodeGraphs with the stand-in capture, eager), batch 2."""
    rt = dbrx_aot.load_runtime(artifacts["auto"], "aoti", progress=False)
    rt.decode_graphs = DecodeGraphs(rt._decode, capture=replay_eagerly)
    return rt, dbrx_aot.load_runtime(artifacts["auto"], "eager", progress=False)


def test_cuda_graphs_are_off_on_cpu_and_asking_for_them_is_an_error(artifacts):
    rt = dbrx_aot.load_runtime(artifacts["auto"], "aoti", progress=False)
    assert rt.cuda_graphs is False and rt.decode_graphs is None
    with pytest.raises(DbrxAotError, match="CUDA graphs need a CUDA device"):
        dbrx_aot.load_runtime(artifacts["auto"], "aoti", progress=False, cuda_graphs=True)
    assert dbrx_aot.load_runtime(artifacts["auto"], "aoti", progress=False, cuda_graphs=False).cuda_graphs is False


def test_graphed_decode_climbs_the_parity_ladder(graphed):
    rt, eager = graphed
    assert rt.cuda_graphs
    check_prefill_and_decode(rt, eager, atol=TOLERANCE[("aoti", torch.float32)])
    check_long_and_ragged_prompts(rt, eager)


def test_one_graph_per_cache_keeps_two_conversations_apart(graphed):
    rt, _ = graphed
    before = rt.decode_graphs.captures
    check_two_caches(rt)  # two caches alone, then two interleaved: four caches, captured once each
    assert rt.decode_graphs.captures - before == 4


def test_a_cache_is_captured_once_and_its_logits_are_copies(graphed):
    rt, eager = graphed
    graphs = rt.decode_graphs
    cache, ref = rt.new_cache(), eager.new_cache()
    before = graphs.captures
    outs = []
    for p, token in enumerate([5, 7, 11]):
        tokens, positions = torch.full((2, 1), token), torch.full((2, 1), p)
        outs.append(rt.decode(tokens, positions, cache))
        torch.testing.assert_close(outs[-1], eager.decode(tokens, positions, ref), atol=1e-4, rtol=0)
    assert graphs.captures - before == 1
    assert not torch.equal(outs[0], outs[1])  # the first step's logits were not overwritten


def test_least_recently_used_graph_is_evicted_and_recaptured_correctly(artifacts):
    rt = dbrx_aot.load_runtime(artifacts["auto"], "aoti", progress=False)
    graphs = rt.decode_graphs = DecodeGraphs(rt._decode, capture=replay_eagerly, max_graphs=2)
    plain = dbrx_aot.load_runtime(artifacts["auto"], "aoti", progress=False)
    caches = [rt.new_cache() for _ in range(3)]
    refs = [plain.new_cache() for _ in range(3)]
    for p in range(2):
        for i in (0, 1, 2, 0):  # cache 0 is evicted by cache 2, then seen again
            tokens, positions = torch.full((2, 1), 3 + i + 10 * p), torch.full((2, 1), p)
            torch.testing.assert_close(rt.decode(tokens, positions, caches[i]),
                                       plain.decode(tokens, positions, refs[i]), atol=0, rtol=0)
    assert len(graphs.graphs) == 2 and list(graphs.graphs) == [DecodeGraphs.key(caches[2]),
                                                               DecodeGraphs.key(caches[0])]
    # First round: 0, 1, 2 (evicts 0), 0 (evicts 1). Second: 0 replays; 1, 2, 0 are captured again.
    assert graphs.captures == 7


def test_random_weights_are_bound_instead_of_the_files(artifacts):
    """What the real-width slice bench uses: weights made on the device, none read from disk."""
    path = artifacts["gather"]
    rt = dbrx_aot.load_runtime(path, "aoti", progress=False, random_weights=0)
    again = dbrx_aot.load_runtime(path, "aoti", progress=False, random_weights=0)
    real = dbrx_aot.load_runtime(path, "aoti", progress=False)
    tokens, positions = torch.full((1, 1), 42), torch.zeros(1, 1, dtype=torch.int64)
    x = rt.decode(tokens, positions, rt.new_cache())
    assert torch.equal(x, again.decode(tokens, positions, again.new_cache()))  # seeded
    assert not torch.allclose(x, real.decode(tokens, positions, real.new_cache()))
    assert set(rt.weights) == set(real.weights)
    assert all(rt.weights[k].shape == real.weights[k].shape and rt.weights[k].dtype == real.weights[k].dtype
               for k in rt.weights)


def test_bench_records_cuda_graphs_layers_and_random_weights(artifacts):
    report = bench(artifacts["gather"], ["aoti"], prompt_len=8, new_tokens=3, progress=False, random_weights=1)
    r = report["results"]["aoti"]
    assert r["cuda_graphs"] is False and r["random_weights"] == 1
    assert r["decode_ms_per_layer"] == pytest.approx(r["decode_ms_p50"] / 2)  # the tiny preset's 2 layers
    with pytest.raises(DbrxAotError, match="only the aoti runtime binds random weights"):
        bench(artifacts["gather"], ["eager", "aoti"], prompt_len=8, new_tokens=3, progress=False, random_weights=1)
    with pytest.raises(DbrxAotError, match="CUDA graphs need a CUDA device"):
        bench(artifacts["gather"], ["aoti"], prompt_len=8, new_tokens=3, progress=False, cuda_graphs=True)
