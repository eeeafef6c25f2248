"""CUDA graphs for decode: one decode step replays a captured graph instead of launching each kernel.

A graph replays fixed addresses. The KV cache is an input of the decode graph, so each cache gets
its own graph, keyed by the addresses of its two tensors: a replay reads and writes exactly the
cache it was captured on, and two conversations (two caches) never share a graph. The runtime's
input checks have already fixed the cache's shape, dtype and device, so a new cache that lands at a
freed cache's addresses may reuse that graph: it is the same computation on the same memory.

Why not one graph over static cache buffers: the cache would be copied in and out every step, which
reads and writes all of [L, B, K, S, hd] twice, bytes that can rival the weights a step reads.
Per-cache capture costs one warm-up step and one capture the first time a cache is seen, and the
graph's own memory (its intermediates and logits, not the weights) per cache held; at most
``max_graphs`` are kept, least recently used first out.

Tokens and positions are copied into static buffers that all graphs share (replays run one at a
time, on one stream). A replay's logits live in the graph's memory and its next replay overwrites
them, so a copy is returned.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Callable

import torch

from dbrx_aot.runtimes import KVCache

Step = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
# fn -> (replay, output): run fn once into a graph; replay() reruns it, writing into output.
Capture = Callable[[Callable[[], torch.Tensor]], tuple[Callable[[], None], torch.Tensor]]


def capture_cuda_graph(fn: Callable[[], torch.Tensor]) -> tuple[Callable[[], None], torch.Tensor]:
    """Warm up ``fn`` on a side stream, then capture it in a CUDA graph (torch's documented recipe).

    The warm-up is a real decode step: it writes the step's keys and values into the cache, and the
    first replay writes the same values again (the same inputs), so running it twice is harmless.
    """
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()
    return graph.replay, out


class DecodeGraphs:
    """Decode through one captured graph per KV cache (see the module docstring)."""

    def __init__(self, step: Step, capture: Capture = capture_cuda_graph, max_graphs: int = 8):
        assert max_graphs >= 1
        self.step, self.capture, self.max_graphs = step, capture, max_graphs
        self.graphs: OrderedDict[tuple[int, int], tuple[Callable[[], None], torch.Tensor]] = OrderedDict()
        self.static: tuple[torch.Tensor, torch.Tensor] | None = None  # tokens, positions [B, 1]
        self.captures = 0  # how many graphs were captured (a new cache, or one evicted and seen again)

    @staticmethod
    def key(cache: KVCache) -> tuple[int, int]:
        return cache.k.data_ptr(), cache.v.data_ptr()

    def __call__(self, tokens: torch.Tensor, positions: torch.Tensor, cache: KVCache) -> torch.Tensor:
        if self.static is None:  # allocated outside every graph's memory pool
            self.static = (torch.empty_like(tokens), torch.empty_like(positions))
        static_tokens, static_positions = self.static
        static_tokens.copy_(tokens)
        static_positions.copy_(positions)
        key = self.key(cache)
        if key in self.graphs:
            self.graphs.move_to_end(key)
            replay, logits = self.graphs[key]
            replay()
        else:
            k, v = cache.k, cache.v
            replay, logits = self.capture(lambda: self.step(static_tokens, static_positions, k, v))
            self.captures += 1
            self.graphs[key] = (replay, logits)
            if len(self.graphs) > self.max_graphs:
                self.graphs.popitem(last=False)
            replay()  # capture records without running: this is the step
        return logits.clone()
