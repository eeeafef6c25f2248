"""Tracing without weights: the model on empty storage, example inputs, torch.export, stage logs."""

from __future__ import annotations

import gc
import logging
import resource
import time
import warnings
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from dbrx_aot.checkpoint import meta_model
from dbrx_aot.config import DbrxConfig
from dbrx_aot.errors import DbrxAotError
from dbrx_aot.model import CachedStep, DbrxModel, FunctionalStep, MoeMode, cache_shape
from dbrx_aot.tp import shard_model

log = logging.getLogger("dbrx_aot.export")

GRAPHS = ("prefill", "decode")
ATTENTION_MODES = ("auto", "math", "sdpa")
MOE_KERNELS = ("auto", "inductor", "triton")


def peak_rss_gb() -> tuple[float, float]:
    """Peak resident memory of this process and of its finished children (the C++ compiler), GB."""
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1e6
    return own, children


@contextmanager
def stage(name: str, timings: dict, bar=None):
    """Log a stage's wall time and peak RSS, and record them (and advance ``bar``, a tqdm)."""
    if bar is not None:
        bar.set_description(f"export: {name}")
    log.info("%s ...", name)
    start = time.perf_counter()
    yield
    seconds = time.perf_counter() - start
    own, children = peak_rss_gb()
    timings[name] = {"seconds": round(seconds, 2), "peak_rss_gb": round(own, 3),
                     "peak_child_rss_gb": round(children, 3)}
    log.info("%s: %.1f s, peak RSS %.2f GB (compiler processes %.2f GB)", name, seconds, own, children)
    if bar is not None:
        bar.update()


def empty_model(config: DbrxConfig, dtype: torch.dtype, device: torch.device, weights_format: str = "same",
                tp: int = 1, group: str | None = None) -> DbrxModel:
    """The model (rank 0's shard under tensor parallelism: every rank's has the same shapes) with
    uninitialised storage: on CPU, virtual memory whose pages are never touched, so tracing and
    compiling the 132B configuration costs no RAM for weights."""
    model = shard_model(meta_model(config, dtype, weights_format), 0, tp, group)
    return model.to_empty(device=device).eval().requires_grad_(False)


@dataclass(frozen=True)
class GraphSpec:
    name: str         # prefill or decode
    tokens: int       # T: P for prefill, 1 for decode
    moe: MoeMode

    @property
    def selects_logits(self) -> bool:
        """Prefill takes ``logit_index`` [B] and returns one position's logits per row [B, 1, V]."""
        return self.name == "prefill"


def resolve_attention(attention: str, spec: GraphSpec, device: torch.device) -> str:
    """``auto``: scaled_dot_product_attention for CPU prefill graphs, where it was measured faster
    (small preset, S=2048, P=512: 565-574 vs 456-459 tok/s; P=64: 558 vs 543); the written-out
    form elsewhere: CPU decode gains nothing (sdpa copies the cache per layer: 33 vs 41-46 tok/s),
    and CUDA is not measured yet."""
    if attention not in ATTENTION_MODES:
        raise DbrxAotError(f"--attention {attention}: expected one of {', '.join(ATTENTION_MODES)}")
    if attention == "auto":
        return "sdpa" if device.type == "cpu" and spec.name == "prefill" else "math"
    return attention


def resolve_moe_kernel(kernel: str, spec: GraphSpec, device: torch.device) -> str:
    """How an AOTInductor graph computes its gather-form experts: ``inductor`` (model.MoE's products
    in PyTorch, compiled by Inductor) or ``triton`` (model.use_triton_gather: moe_kernels' kernels,
    compiled for CUDA only). ``auto``: inductor, until the Triton kernels are measured against it on a
    GPU (the GPU check's slice ``batch1-triton``). A graph whose experts are not gathered (dense,
    grouped) has nothing to swap: inductor."""
    if kernel not in MOE_KERNELS:
        raise DbrxAotError(f"--moe-kernel {kernel}: expected one of {', '.join(MOE_KERNELS)}")
    if kernel == "triton" and device.type != "cuda":
        raise DbrxAotError(f"--moe-kernel triton: the Triton kernels compile for CUDA only, not --device {device.type}")
    return "triton" if kernel == "triton" and spec.moe == "gather" else "inductor"


EXTENT_STEP = 4  # each cache extent of a prefill graph is this many times the one below it


def attention_extents(spec: GraphSpec, device: torch.device, max_seq_len: int,
                      dtype: torch.dtype) -> tuple[int, ...]:
    """The cache extents an AOTInductor fp32 prefill graph on CPU attends within (model.within_extent):
    0 (a prompt's first chunk reads no cache slot, only its own keys), then P, 4P, 16P, ... below S;
    a chunk whose rows have cached more attends over all S. None for decode (one branch a step would
    cost more than it saves on this cache's size), for CUDA (not measured yet; the branch reads its
    predicate on the host) and for bf16/fp16 (not measured in half precision)."""
    if device.type != "cpu" or spec.name != "prefill" or dtype != torch.float32:
        return ()
    extents, E = [0], spec.tokens
    while E < max_seq_len:
        extents.append(E)
        E *= EXTENT_STEP
    return tuple(extents)


def example_inputs(config: DbrxConfig, spec: GraphSpec, batch_size: int, max_seq_len: int,
                   dtype: torch.dtype, device: torch.device, tp: int = 1) -> tuple[torch.Tensor, ...]:
    shape = cache_shape(config, batch_size, max_seq_len, tp)
    T = spec.tokens
    inputs = (torch.zeros(batch_size, T, dtype=torch.int64, device=device),
              torch.arange(T, device=device).expand(batch_size, T).contiguous(),
              torch.empty(shape, dtype=dtype, device=device),
              torch.empty(shape, dtype=dtype, device=device))
    if spec.selects_logits:
        inputs += (torch.full((batch_size,), T - 1, dtype=torch.int64, device=device),)
    return inputs


def io_description(config: DbrxConfig, spec: GraphSpec, batch_size: int, max_seq_len: int, dtype: torch.dtype,
                   functional: bool, tp: int = 1) -> dict:
    """The graph's inputs and outputs as the manifest records them (one rank's, under --tp)."""
    dt = str(dtype).removeprefix("torch.")
    cache = list(cache_shape(config, batch_size, max_seq_len, tp))
    T = spec.tokens
    inputs = [{"name": "tokens", "shape": [batch_size, T], "dtype": "int64"},
              {"name": "positions", "shape": [batch_size, T], "dtype": "int64"},
              {"name": "k_cache", "shape": cache, "dtype": dt},
              {"name": "v_cache", "shape": cache, "dtype": dt}]
    if spec.selects_logits:
        inputs.append({"name": "logit_index", "shape": [batch_size], "dtype": "int64"})
    outputs = [{"name": "logits", "shape": [batch_size, 1 if spec.selects_logits else T, config.vocab_size],
                "dtype": dt}]
    if functional:
        new = [config.n_layers, batch_size, config.kv_n_heads, T, config.head_dim]
        outputs += [{"name": "new_k", "shape": new, "dtype": dt}, {"name": "new_v", "shape": new, "dtype": dt}]
    return {"inputs": inputs, "outputs": outputs, "moe": spec.moe, "tokens_per_call": T}


@contextmanager
def torch_deprecations_hidden():
    """torch's own pytree deprecation warning, raised inside torch.export / AOTInductor (not the
    user's business: it printed twice per export, even with --quiet)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated",
                                category=FutureWarning)
        yield


def export_program(model: DbrxModel, spec: GraphSpec, batch_size: int, max_seq_len: int,
                   functional: bool = False) -> torch.export.ExportedProgram:
    param = model.wte.weight  # the compute dtype (matrices may be stored in another)
    step = (FunctionalStep if functional else CachedStep)(model, spec.moe)
    args = example_inputs(model.config, spec, batch_size, max_seq_len, param.dtype, param.device, model.tp)
    with torch_deprecations_hidden():
        return torch.export.export(step, args, strict=False)


def release_traces() -> None:
    """Let go of the model torch.export traced last. torch.export keeps that trace's nodes in a map of
    its own (torch 2.11, 2.13: ``proxy_tensor._FAKE_TENSOR_ID_TO_PROXY_MAP_FOR_EXPORT``, read only while
    an export runs) and, through them, the module and its weights: on CUDA, where the empty model's
    storage is real, an export followed by a load in the same process held the weights twice. Not
    released: a CPU fp32 prefill graph's (its torch.cond branches are kept by Dynamo's cache), whose
    CPU storage is never touched and costs no memory."""
    from torch.fx.experimental import proxy_tensor

    getattr(proxy_tensor, "_FAKE_TENSOR_ID_TO_PROXY_MAP_FOR_EXPORT", {}).clear()
    gc.collect()  # the trace's module and tensors are held in reference cycles
