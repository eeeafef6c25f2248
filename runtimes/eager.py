"""The eager PyTorch runtime: the reference every compiled artifact is checked against."""

from __future__ import annotations

from pathlib import Path

import torch

from dbrx_aot.checkpoint import load_model
from dbrx_aot.config import DbrxConfig, check_static_shapes, parse_dtype
from dbrx_aot.errors import DbrxAotError
from dbrx_aot.model import CachedStep, DbrxModel, resolve_moe_mode
from dbrx_aot.devices import resolve_device
from dbrx_aot.runtimes import KVCache, RuntimeBase
from dbrx_aot.tokenizer import Tokenizer
from dbrx_aot.tp import check_tp, check_world, python_group, world


class EagerRuntime(RuntimeBase):
    name = "eager"

    def __init__(self, model: DbrxModel, tokenizer: Tokenizer, *, batch_size: int, max_seq_len: int,
                 prefill_chunk: int, moe: str = "auto", rank: int = 0, moe_modes: dict[str, str] | None = None):
        """``model``: the whole model, or rank ``rank``'s shard of ``model.tp`` (``tp.shard_model``);
        ``moe_modes``: each graph's MoE form as an artifact's manifest resolved them (else from ``moe``)."""
        config = model.config
        check_static_shapes(config, batch_size, max_seq_len, prefill_chunk)
        self.model = model
        self.config: DbrxConfig = config
        self.tokenizer = tokenizer
        param = model.wte.weight  # the compute dtype (matrices may be stored in another)
        self.device, self.dtype = param.device, param.dtype
        self.batch_size, self.max_seq_len, self.prefill_chunk = batch_size, max_seq_len, prefill_chunk
        self.moe = moe
        self.rank, self.tp = rank, model.tp
        moe_modes = moe_modes or {
            graph: resolve_moe_mode(moe, tokens, config, self.dtype, self.device)
            for graph, tokens in (("prefill", batch_size * prefill_chunk), ("decode", batch_size))}
        self._prefill = CachedStep(model, moe_modes["prefill"])
        self._decode = CachedStep(model, moe_modes["decode"])
        self.decode_moe = self._decode.moe

    @classmethod
    def load(cls, path: Path, device="cpu", dtype=None, batch_size: int = 1, max_seq_len: int | None = None,
             prefill_chunk: int | None = None, moe: str = "auto", weights: str = "same",
             verify_checksums: bool = True, progress: bool = True) -> EagerRuntime:
        """A Hugging Face checkpoint directory, or an artifact directory (its weights/, their format,
        and its shapes). ``weights`` (checkpoints only): how to hold the matrices, as export's
        ``--weights`` (``int8`` quantises while loading).

        Under torchrun each rank holds its shard: of a TP artifact, by its degree; of a checkpoint,
        by the world size (the same sharded model the compiled TP artifact runs)."""
        from dbrx_aot.manifest import MANIFEST, Manifest  # an artifact carries its own shapes

        path = Path(path)
        rank, size, _ = world()
        group = python_group().group_name if size > 1 else None  # not the compiled packages' (tp.all_reduce)
        if (path / MANIFEST).is_file():
            manifest = Manifest.read(path)
            if not manifest.has_weights():
                raise DbrxAotError(f"{path}: exported with --skip-weights (compile-only); it has no weights to run")
            check_world(path, manifest.tp, None)  # eager's collectives run on this world's group
            device = resolve_device(device)
            manifest.verify_files(path, manifest.weight_files(rank), checksums=verify_checksums, progress=progress)
            if weights != "same":
                raise DbrxAotError(f"{path}: an artifact's weights are already stored as "
                                   f"{manifest.weights_format}; weights={weights!r} applies to checkpoints")
            dtype = parse_dtype(dtype or manifest.dtype)
            model = load_model(path, manifest.config, dtype, device, weights_format=manifest.weights_format,
                               weights=manifest.iter_weights(path, progress=progress, rank=rank),
                               rank=rank, tp=manifest.tp, group=group)
            return cls(model, manifest.tokenizer_obj(), batch_size=manifest.batch_size,
                       max_seq_len=manifest.max_seq_len, prefill_chunk=manifest.prefill_chunk, moe=manifest.moe,
                       rank=rank, moe_modes=manifest.moe_modes)
        config = DbrxConfig.from_file(path)
        device = resolve_device(device)
        dtype = parse_dtype(dtype or ("bfloat16" if device.type == "cuda" else "float32"))
        max_seq_len = min(config.max_seq_len, 4096) if max_seq_len is None else max_seq_len
        prefill_chunk = min(max_seq_len, 64) if prefill_chunk is None else prefill_chunk
        check_static_shapes(config, batch_size, max_seq_len, prefill_chunk)  # before reading any weight
        check_tp(config, size, f"a world of {size} ranks (torchrun)")
        model = load_model(path, config, dtype, device, progress=progress, weights_format=weights,
                           rank=rank, tp=size, group=group)
        return cls(model, Tokenizer.from_checkpoint(path), batch_size=batch_size, max_seq_len=max_seq_len,
                   prefill_chunk=prefill_chunk, moe=moe, rank=rank)

    def run_graph(self, graph: str, tokens: torch.Tensor, positions: torch.Tensor, cache: KVCache,
                  logit_index: torch.Tensor | None = None) -> torch.Tensor:
        if graph == "prefill":
            return self._prefill(tokens, positions, cache.k, cache.v, logit_index)
        return self._decode(tokens, positions, cache.k, cache.v)

    def prefill_at(self, tokens: torch.Tensor, positions: torch.Tensor, cache: KVCache,
                   index: torch.Tensor) -> torch.Tensor:
        logits = self.run_checked("prefill", tokens, positions, cache)  # [B, P, V]: the module's one call
        return logits.gather(1, index[..., None].expand(-1, -1, logits.shape[-1]))  # [B, R, V]
