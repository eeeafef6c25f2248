"""What the compiled-artifact runtimes (aoti, onnxruntime) share: opening and checking an artifact,
and the attributes its manifest fixes."""

from __future__ import annotations

from pathlib import Path

import torch

from dbrx_aot.errors import DbrxAotError
from dbrx_aot.manifest import Manifest
from dbrx_aot.devices import resolve_device
from dbrx_aot.runtimes import RuntimeBase
from dbrx_aot.tp import check_world


def open_artifact(path: Path, fmt: str, device, need_weights: bool = True) -> tuple[Manifest, torch.device, int]:
    """The manifest (checked), the device and this process's rank: the format is there, weights (if
    needed), and the world (torchrun's ranks) matches the artifact's TP degree."""
    manifest = Manifest.read(path)
    if fmt not in manifest.formats:
        raise DbrxAotError(f"{path}: holds {', '.join(manifest.formats)}, not {fmt} (re-export with "
                           f"--format {fmt})")
    if need_weights and not manifest.has_weights():
        raise DbrxAotError(f"{path}: exported with --skip-weights (compile-only); it has no weights to run")
    rank = check_world(path, manifest.tp, manifest.tp_group)
    return manifest, resolve_device(device), rank


def verify_artifact_files(manifest: Manifest, path: Path, fmt: str, checksums: bool, progress: bool,
                          weights: bool = True, rank: int = 0) -> None:
    """The two graphs of ``fmt`` and (if ``weights``) rank ``rank``'s weights: present, the right
    size, and (unless disabled) sha256."""
    graphs = [manifest.graphs[g][fmt] for g in ("prefill", "decode")]
    files = manifest.weight_files(rank) if weights else []
    manifest.verify_files(path, graphs + files, checksums=checksums, progress=progress)


class ArtifactRuntime(RuntimeBase):
    def __init__(self, path: Path, manifest: Manifest, device: torch.device, rank: int = 0):
        self.path, self.manifest = path, manifest
        self.rank, self.tp = rank, manifest.tp
        self.config = manifest.config
        self.tokenizer = manifest.tokenizer_obj()
        self.device = device
        self.dtype = manifest.torch_dtype()
        self.batch_size, self.max_seq_len = manifest.batch_size, manifest.max_seq_len
        self.prefill_chunk = manifest.prefill_chunk
        self.decode_moe = manifest.moe_modes["decode"]
