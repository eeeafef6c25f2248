"""Tensor parallelism, Megatron style: one table of how each parameter is split, one transform.

Rank r of N holds (``TP_SPLITS``):
- Wqkv: the rows of its kv-head group: query heads [r H/N, (r+1) H/N), key and value heads
  [r K/N, (r+1) K/N) (query head h reads kv head h // G, so the group is self-contained);
- out_proj: the matching input columns; its partial products are summed by an ``all_reduce``;
- the experts w1, v1, w2 [E, F, D]: F/N of the ffn width of every expert, then an ``all_reduce``
  (the router is replicated, so every rank routes every token the same way);
- lm_head: V/N vocabulary rows, then an ``all_gather``, so every rank holds the full logits and
  samples the same ids;
- wte, the router and the LayerNorms: replicated. int8 scales follow their matrix (replicated
  when the split runs along the reduction, whose one scale per output channel every shard shares).

The collectives are ``torch.distributed._functional_collectives`` calls on a process group named
by a string: inside a compiled graph they are ops (``_c10d_functional.all_reduce`` +
``wait_tensor``), so one AOTInductor package, compiled once under a fake world of N ranks
(``compile_world``), serves every rank; each rank binds its own shard of the weights. Nothing
rank-dependent is in the graph. With N = 1 nothing changes: no collective, no split.

Launch: torchrun (NCCL on CUDA with ``cuda:LOCAL_RANK``, gloo on CPU); ``init_from_env`` joins the
world torchrun describes.
"""

from __future__ import annotations

import atexit
import datetime
import json
import os
import random
from contextlib import contextmanager
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
from torch import nn
from torch.distributed.distributed_c10d import _resolve_process_group

from dbrx_aot.config import DbrxConfig
from dbrx_aot.errors import DbrxAotError
from dbrx_aot.quantize import reduction_dim

# Parameter (by name suffix) -> how it is split: a dimension (chunk r of N along it), "qkv" (the
# rows of rank r's kv-head group in each of q, k and v), or absent: replicated.
TP_SPLITS: dict[str, int | str] = {
    "attn.Wqkv.weight": "qkv",
    "attn.out_proj.weight": 1,
    "ffn.w1": 1,
    "ffn.v1": 1,
    "ffn.w2": 1,
    "lm_head.weight": 0,
}
# What a dead or stalled rank costs the others before they fail (torch.distributed's own default
# is 10 minutes for gloo and NCCL); override with DBRX_AOT_TP_TIMEOUT (seconds).
DEFAULT_TIMEOUT_S = 120


def undivided(config: DbrxConfig, tp: int) -> str | None:
    """What a TP degree ``tp`` does not divide (the kv heads, the expert ffn width, the vocabulary),
    None when it divides all three."""
    for what, size in (("kv heads (attn_config.kv_n_heads)", config.kv_n_heads),
                       ("expert ffn width (ffn_config.ffn_hidden_size)", config.ffn_hidden_size),
                       ("vocabulary (vocab_size)", config.vocab_size)):
        if size % tp:
            return f"the {size} {what}"
    return None


def check_tp(config: DbrxConfig, tp: int, label: str | None = None) -> int:
    """N must divide the kv heads, the expert ffn width and the vocabulary (``label`` names N in errors)."""
    label = label or f"--tp {tp}"
    if not isinstance(tp, int) or isinstance(tp, bool) or tp < 1:
        raise DbrxAotError(f"{label}: expected a positive integer")
    what = undivided(config, tp)
    if what is not None:
        raise DbrxAotError(f"{label}: {tp} does not divide {what}; each rank must hold an equal share")
    return tp


def split_of(name: str) -> int | str | None:
    """How a stored tensor is split: a parameter by ``TP_SPLITS``; an int8 scale (``x.scale``,
    ``ffn.w1_scale``) as its matrix without the reduction dimension, None where that was the split."""
    for suffix, split in TP_SPLITS.items():
        if name == suffix or name.endswith("." + suffix):
            return split
    matrix = name.removesuffix(".scale") + ".weight" if name.endswith(".scale") else name.removesuffix("_scale")
    if matrix == name or split_of(matrix) is None:
        return None
    split, reduced = split_of(matrix), reduction_dim(matrix)
    if split == "qkv":
        return split  # rows; the reduction is over columns
    return None if split == reduced else split - (split > reduced)


def shard(name: str, tensor: torch.Tensor, rank: int, tp: int, config: DbrxConfig) -> torch.Tensor:
    """Rank ``rank``'s part of a stored tensor (itself when replicated). Works on meta tensors."""
    split = split_of(name) if tp > 1 else None
    if split is None:
        return tensor
    if split == "qkv":
        q, kv = config.d_model, config.kv_n_heads * config.head_dim
        parts = tensor.split([q, kv, kv])                               # rows of q, k, v
        return torch.cat([p.chunk(tp)[rank] for p in parts]).contiguous()
    return tensor.chunk(tp, dim=split)[rank].contiguous()


def shard_model(model: nn.Module, rank: int, tp: int, group: str) -> nn.Module:
    """Rank ``rank``'s part of a DbrxModel (any weight format, real or meta), in place: each parameter
    replaced by its shard, attention on its share of the heads, and the collectives (over the
    process group named ``group``) after out_proj, the experts and lm_head."""
    if tp == 1:
        return model
    config = model.config
    check_tp(config, tp)
    for name, param in list(model.named_parameters()):
        owner, _, attr = name.rpartition(".")
        part = shard(name, param.detach(), rank, tp, config)
        if part is not param:
            setattr(model.get_submodule(owner), attr, nn.Parameter(part, requires_grad=False))
    for block in model.blocks:
        block.attn.n_heads //= tp
        block.attn.kv_heads //= tp
        block.attn.out_proj.register_forward_hook(lambda _m, _i, out: all_reduce(out, group))
        block.ffn.register_forward_hook(lambda _m, _i, out: all_reduce(out, group))
    model.lm_head.register_forward_hook(lambda _m, _i, out: all_gather_last(out, group))
    model.tp = tp
    return model


# Traced (torch.export), a collective is a functional op of the graph. Run eagerly, it is
# torch.distributed's blocking call on ``python_group()``, which releases the GIL while it
# enqueues and waits. Why (seen on torch 2.13 with gloo, verify running eager and aoti side by
# side): gloo's worker thread frees a finished work's tensors under its queue lock, and a tensor
# Python has seen needs the GIL to be freed; a compiled package holds the GIL for its whole run, so
# its next collective on the same group waited for that lock forever. So the compiled packages
# have the WORLD group to themselves, and every collective Python issues (eager shards, rank 0's
# broadcasts) runs on a second group.


def all_reduce(x: torch.Tensor, group: str) -> torch.Tensor:
    if torch.compiler.is_compiling():
        return funcol.all_reduce(x, "sum", group)
    dist.all_reduce(x, group=_resolve_process_group(group))  # in place: x is the layer's fresh output
    return x


# torch 2.12 renamed the tensor all-gathers *_single and deprecated the old names (they warn): the
# new names where they exist, the old ones before (torch 2.11, the GPU machine's, has only those).
all_gather_into = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_all_gather_functional = getattr(funcol, "all_gather_single", None) or funcol.all_gather_tensor


def all_gather_last(x: torch.Tensor, group: str) -> torch.Tensor:
    """[..., V/N] on each rank -> [..., V], rank order along the last dimension."""
    x = x.contiguous()
    if torch.compiler.is_compiling():
        return _all_gather_functional(x, x.dim() - 1, group)                  # [B, ..., V]
    pg = _resolve_process_group(group)
    gathered = x.new_empty((dist.get_world_size(pg) * x.shape[0], *x.shape[1:]))  # [N*B, ..., V/N]
    all_gather_into(gathered, x, group=pg)
    return torch.cat(gathered.chunk(dist.get_world_size(pg)), dim=-1)           # [B, ..., V]


_python_group: tuple[dist.ProcessGroup, dist.ProcessGroup] | None = None  # (WORLD, its second group)


def python_group() -> dist.ProcessGroup:
    """The process group for the collectives Python issues (see ``all_reduce``): made once per
    world, by every rank at the same point (creating a group is itself collective)."""
    global _python_group
    if _python_group is None or _python_group[0] is not dist.group.WORLD:
        _python_group = (dist.group.WORLD, dist.new_group(backend=dist.get_backend()))
    return _python_group[1]


# -- worlds ------------------------------------------------------------------------------------------


@contextmanager
def compile_world(tp: int):
    """A fake process group of ``tp`` ranks in this one process, for tracing and compiling the
    collectives (no communication happens); yields the group's name, which the package bakes in."""
    if dist.is_initialized():
        raise DbrxAotError(f"export --tp {tp} compiles in one process, outside any process group (run it "
                           "without torchrun)")
    # torch registers the "fake" backend's constructor in this module (torch 2.9 to 2.13), not at import.
    import torch.testing._internal.distributed.fake_pg  # noqa: F401

    dist.init_process_group("fake", rank=0, world_size=tp, store=dist.HashStore())
    try:
        yield dist.group.WORLD.group_name
    finally:
        dist.destroy_process_group()


def timeout() -> datetime.timedelta:
    value = os.environ.get("DBRX_AOT_TP_TIMEOUT", str(DEFAULT_TIMEOUT_S))
    try:
        seconds = float(value)
    except ValueError:
        raise DbrxAotError(f"DBRX_AOT_TP_TIMEOUT={value!r}: expected seconds") from None
    return datetime.timedelta(seconds=seconds)


def launched_by_torchrun() -> bool:
    return "WORLD_SIZE" in os.environ and "RANK" in os.environ


def init_from_env(device: str | torch.device) -> None:
    """Join the world torchrun describes (WORLD_SIZE, RANK, LOCAL_RANK, MASTER_ADDR...), once: NCCL
    on CUDA (this rank on ``cuda:LOCAL_RANK``), gloo on CPU; left at exit. A no-op outside torchrun."""
    if dist.is_initialized() or not launched_by_torchrun():
        return
    cuda = torch.device(device).type == "cuda"
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group("nccl" if cuda else "gloo", timeout=timeout())
    atexit.register(leave_world)


def leave_world() -> None:
    """Destroy this process's groups, if it joined a world; ``init_from_env`` has it run at exit,
    while the interpreter still runs (atexit), not later. Why (seen on torch 2.13 with gloo, 3 of
    20 runs of ``torchrun ... bench``): gloo's worker thread frees a finished work's tensors a
    moment after the caller's wait returns; where Python has already dropped them, that needs the
    GIL; once the interpreter is finalizing, a thread taking the GIL exits, and exiting through C++
    frames aborts the rank ("terminate called without an active exception"). Destroying the groups
    joins their worker threads first."""
    global _python_group
    if dist.is_initialized():
        _python_group = None
        dist.destroy_process_group()


def world() -> tuple[int, int, str | None]:
    """(rank, world size, the WORLD group's name); (0, 1, None) outside a process group."""
    if not dist.is_initialized():
        return 0, 1, None
    return dist.get_rank(), dist.get_world_size(), dist.group.WORLD.group_name


def follower() -> bool:
    """A rank other than 0 of a torchrun launch: it computes in lock step, rank 0 reads and prints."""
    return launched_by_torchrun() and os.environ["RANK"] != "0"


def from_leader(value_on_leader: Callable[[], Any]) -> Any:
    """Rank 0's ``value_on_leader()`` (JSON: a chat line, a seed, None) on every rank; called on rank
    0 only, or plainly outside a world."""
    rank, size, _ = world()
    if size == 1:
        return value_on_leader()
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
    group = python_group()
    data = json.dumps(value_on_leader()).encode() if rank == 0 else b""
    length = torch.tensor([len(data)], dtype=torch.int64, device=device)
    dist.broadcast(length, src=0, group=group)
    buffer = (torch.frombuffer(bytearray(data), dtype=torch.uint8).to(device) if rank == 0 else
              torch.empty(int(length), dtype=torch.uint8, device=device))
    dist.broadcast(buffer, src=0, group=group)
    return json.loads(bytes(buffer.cpu().tolist()).decode())


def common_seed(seed: int | None) -> int | None:
    """The same sampling seed on every rank (rank 0 draws one when none is given), so every rank
    samples the same ids from the same logits; unchanged outside a world."""
    if seed is not None or world()[1] == 1:
        return seed
    return from_leader(lambda: random.getrandbits(63))


def check_world(path, tp: int, group: str | None) -> int:
    """This process's rank for an artifact of TP degree ``tp``; one line naming the torchrun command
    when the world does not match (on every rank)."""
    rank, size, name = world()
    command = f"torchrun --nproc-per-node {tp} -m dbrx_aot ..."
    if tp == 1:
        if size > 1:
            raise DbrxAotError(f"{path}: a single-process artifact (exported without --tp), launched in a world of "
                               f"{size} ranks; run it without torchrun, or re-export with --tp {size}")
        return 0
    if size != tp:
        how = f"in a world of {size} ranks" if launched_by_torchrun() else "without torchrun"
        raise DbrxAotError(f"{path}: exported with --tp {tp}, launched {how}; run it as `{command}`")
    if group is not None and name != group:
        raise DbrxAotError(f"{path}: compiled for process group {group!r}, this world's group is {name!r} "
                           "(initialise the default process group before creating any other)")
    return rank
