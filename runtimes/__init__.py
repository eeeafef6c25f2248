"""Runtimes: what executes the two graphs (prefill, decode) over a KV cache the caller owns.

Built-ins are listed in ``BUILTIN``; third parties add one through the entry point group
``dbrx_aot.runtimes`` (name -> a class with ``load(path, device=..., **options)``).
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
from importlib.metadata import entry_points
from pathlib import Path
from typing import Iterator, Protocol, Sequence, runtime_checkable

import torch

from dbrx_aot.config import DbrxConfig
from dbrx_aot.errors import DbrxAotError
from dbrx_aot.model import cache_shape
from dbrx_aot.tokenizer import Tokenizer
from dbrx_aot.tp import init_from_env, timeout

BUILTIN = {
    "eager": "dbrx_aot.runtimes.eager:EagerRuntime",
    "aoti": "dbrx_aot.runtimes.aoti:AotiRuntime",
    "onnxruntime": "dbrx_aot.runtimes.onnxruntime:OnnxRuntime",
}
ENTRY_POINT_GROUP = "dbrx_aot.runtimes"
# The token id in padding slots (after a row's last token, and in unused rows). Any valid id would
# do: no real position ever attends to a padding slot. 0 is valid in every vocabulary.
PAD_TOKEN = 0


def prefill_chunks(rows: Sequence[Sequence[int]], chunk: int, max_seq_len: int,
                   offsets: Sequence[int] | None = None) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
    """Split rows of token ids into prefill calls: (start, tokens [B, P], positions [B, P]).

    Row b's token i sits at position offsets[b] + i. Padding (PAD_TOKEN) follows a row's last
    token and continues its positions, clamped to the last cache slot.
    """
    B, P = len(rows), chunk
    offsets = offsets if offsets is not None else [0] * B
    arange = torch.arange(P)
    for start in range(0, max(len(r) for r in rows), P):
        tokens = torch.full((B, P), PAD_TOKEN, dtype=torch.int64)
        positions = torch.empty((B, P), dtype=torch.int64)
        for b, row in enumerate(rows):
            seg = row[start:start + P]
            tokens[b, :len(seg)] = torch.as_tensor(seg, dtype=torch.int64)
            positions[b] = (offsets[b] + start + arange).clamp(max=max_seq_len - 1)
        yield start, tokens, positions


@dataclasses.dataclass
class KVCache:
    """Keys and values [L, B, K, S, hd], owned by the application; one per conversation."""

    k: torch.Tensor
    v: torch.Tensor


@runtime_checkable
class Runtime(Protocol):
    name: str
    config: DbrxConfig
    tokenizer: Tokenizer
    device: torch.device
    dtype: torch.dtype
    batch_size: int     # B: rows per call
    max_seq_len: int    # S: cache slots per row
    prefill_chunk: int  # P: tokens per prefill call
    decode_moe: str     # the MoE mode of the decode graph: dense or gather

    def new_cache(self) -> KVCache: ...

    def prefill(self, tokens: torch.Tensor, positions: torch.Tensor, cache: KVCache,
                logit_index: torch.Tensor | None = None) -> torch.Tensor:
        """tokens, positions [B, P] -> logits; writes the P positions into ``cache``. With
        ``logit_index`` [B] (the chunk position each row samples from): [B, 1, V], what generation
        needs; [B, R] (R positions a row): [B, R, V]; without: every position's, [B, P, V]
        (verification: a compiled runtime runs the chunk once per column of the index)."""

    def decode(self, tokens: torch.Tensor, positions: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """tokens, positions [B, 1] -> logits [B, 1, V]; writes the position into ``cache``."""

    def logits(self, input_ids: torch.Tensor) -> torch.Tensor:
        """input_ids [B, T] on a fresh cache -> logits [B, T, V] for every position."""


class RuntimeBase:
    """What every runtime shares: the cache, input checks, and ``logits`` through prefill."""

    name = "base"
    config: DbrxConfig
    tokenizer: Tokenizer
    device: torch.device
    dtype: torch.dtype
    batch_size: int
    max_seq_len: int
    prefill_chunk: int
    decode_moe: str
    rank = 0  # under tensor parallelism (torchrun): this process's rank of ``tp``
    tp = 1

    def cache_shape(self) -> tuple[int, ...]:
        return cache_shape(self.config, self.batch_size, self.max_seq_len, self.tp)

    def new_cache(self) -> KVCache:
        shape = self.cache_shape()
        return KVCache(torch.zeros(shape, dtype=self.dtype, device=self.device),
                       torch.zeros(shape, dtype=self.dtype, device=self.device))

    def check_call(self, tokens: torch.Tensor, positions: torch.Tensor, cache: KVCache, width: int):
        expected = (self.batch_size, width)
        for label, t in (("tokens", tokens), ("positions", positions)):
            if tuple(t.shape) != expected:
                raise DbrxAotError(f"{self.name} runtime: {label} shape {list(t.shape)}, expected {list(expected)} "
                                   f"(batch size and chunk length are fixed at export)")
        for label, t in (("cache.k", cache.k), ("cache.v", cache.v)):
            if (tuple(t.shape) != self.cache_shape() or t.dtype != self.dtype or t.device != self.device
                    or not t.is_contiguous()):
                raise DbrxAotError(f"{self.name} runtime: {label} is {list(t.shape)} {t.dtype} on {t.device}, "
                                   f"expected a contiguous {list(self.cache_shape())} {self.dtype} on {self.device} "
                                   "(use runtime.new_cache())")
        # Compiled graphs assume dense row-major inputs (AOTInductor aborts the process otherwise).
        return (tokens.to(self.device, torch.int64).contiguous(),
                positions.to(self.device, torch.int64).contiguous())

    def prefill(self, tokens: torch.Tensor, positions: torch.Tensor, cache: KVCache,
                logit_index: torch.Tensor | None = None) -> torch.Tensor:
        tokens, positions = self.check_call(tokens, positions, cache, self.prefill_chunk)
        B, P = tokens.shape
        if logit_index is None:
            return self.prefill_at(tokens, positions, cache, torch.arange(P, device=self.device).expand(B, P))
        index = torch.as_tensor(logit_index).to(self.device, torch.int64).contiguous()
        if (index.dim() not in (1, 2) or tuple(index.shape[:1]) != (B,) or index.numel() == 0
                or not bool(((index >= 0) & (index < P)).all())):
            raise DbrxAotError(f"{self.name} runtime: logit_index {index.tolist()}, expected [{B}] or [{B}, R] chunk "
                               f"positions in [0, {P})")
        if index.dim() == 1:
            return self.run_checked("prefill", tokens, positions, cache, index)
        return self.prefill_at(tokens, positions, cache, index)

    def prefill_at(self, tokens: torch.Tensor, positions: torch.Tensor, cache: KVCache,
                   index: torch.Tensor) -> torch.Tensor:
        """[B, R, V] at the chunk positions ``index`` [B, R]: the compiled prefill graphs return one
        position per row, so the chunk runs once per column (each run writes the same keys and values
        into the cache): R times the work, for verification only; callers ask for the positions they
        compare, not the padding after them. The eager runtime computes them all in one call."""
        return torch.cat([self.run_checked("prefill", tokens, positions, cache, index[:, r].contiguous())
                          for r in range(index.shape[1])], dim=1)

    def decode(self, tokens: torch.Tensor, positions: torch.Tensor, cache: KVCache) -> torch.Tensor:
        tokens, positions = self.check_call(tokens, positions, cache, 1)
        return self.run_checked("decode", tokens, positions, cache)

    def run_checked(self, graph: str, tokens: torch.Tensor, positions: torch.Tensor, cache: KVCache,
                    logit_index: torch.Tensor | None = None) -> torch.Tensor:
        with torch.inference_mode():
            try:
                return self.run_graph(graph, tokens, positions, cache, logit_index)
            except RuntimeError as err:  # gloo / NCCL report a dead or stalled peer this way
                if self.tp == 1:
                    raise
                raise DbrxAotError(
                    f"{self.name} runtime, rank {self.rank} of {self.tp}: the {graph} step failed "
                    f"({str(err).splitlines()[0][:200]}); under tensor parallelism this means another rank exited "
                    f"or stalled past the process-group timeout ({timeout().total_seconds():g} s, "
                    "DBRX_AOT_TP_TIMEOUT)") from None

    def run_graph(self, graph: str, tokens: torch.Tensor, positions: torch.Tensor, cache: KVCache,
                  logit_index: torch.Tensor | None = None) -> torch.Tensor:
        """Run the prefill or decode graph on checked inputs (what each runtime implements);
        ``logit_index`` [B] for prefill (None: every position, where the runtime can)."""
        raise NotImplementedError

    def logits(self, input_ids: torch.Tensor) -> torch.Tensor:
        B, T = input_ids.shape
        if B != self.batch_size or T > self.max_seq_len:
            raise DbrxAotError(f"{self.name} runtime: input_ids {list(input_ids.shape)}, expected "
                               f"[{self.batch_size}, <= {self.max_seq_len}]")
        cache = self.new_cache()
        out = [self.prefill(tokens, positions, cache, torch.arange(min(self.prefill_chunk, T - start)).expand(B, -1))
               for start, tokens, positions in prefill_chunks(input_ids.tolist(), self.prefill_chunk, self.max_seq_len)]
        return torch.cat(out, dim=1)


def runtime_names() -> list[str]:
    return list(BUILTIN) + [ep.name for ep in entry_points(group=ENTRY_POINT_GROUP) if ep.name not in BUILTIN]


def runtime_class(name: str):
    if name in BUILTIN:
        module, attr = BUILTIN[name].split(":")
        return getattr(importlib.import_module(module), attr)
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        if ep.name == name:
            return ep.load()
    raise DbrxAotError(f"unknown runtime {name!r}, expected one of {', '.join(runtime_names())}")


def load_runtime(path: str | Path, runtime: str = "eager", device: str | torch.device = "cpu",
                 **options) -> Runtime:
    """The front door: a checkpoint or artifact directory -> a loaded runtime."""
    path = Path(path)
    if not path.exists():
        raise DbrxAotError(f"{path}: no such file or directory")
    cls = runtime_class(runtime)
    init_from_env(device)  # under torchrun: join its world (each rank then loads its own shard)
    accepted = inspect.signature(cls.load).parameters
    if not any(p.kind is p.VAR_KEYWORD for p in accepted.values()):
        unknown = sorted(set(options) - set(accepted))
        if unknown:
            names = [n for n in accepted if n not in ("path", "device")]
            raise DbrxAotError(f"{runtime} runtime: unknown option {unknown[0]!r}, expected one of "
                               f"{', '.join(names)}")
    return cls.load(path, device=device, **options)
