"""The artifact manifest: what was built, by which versions, for which shapes, and every file's sha256.

Loading reads the manifest first and says precisely what is wrong: an unknown format version, a
missing file, a checksum mismatch, an AOTInductor package built by another torch.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Iterator

import torch
from tqdm.auto import tqdm

from dbrx_aot.config import DbrxConfig, parse_dtype, read_json
from dbrx_aot.errors import DbrxAotError
from dbrx_aot.safetensors_io import open_checked, read_tensor
from dbrx_aot.tokenizer import Tokenizer

MANIFEST = "manifest.json"
FORMAT = "dbrx-aot-artifact"
FORMAT_VERSION = 2  # 2: the prefill graph takes logit_index [B] and returns logits [B, 1, V]
WEIGHTS_DIR = "weights"


@dataclasses.dataclass
class Manifest:
    format_version: int
    versions: dict[str, str | None]
    device: str
    dtype: str
    batch_size: int
    max_seq_len: int
    prefill_chunk: int
    moe: str                          # as requested: auto, dense or gather
    moe_modes: dict[str, str]         # per graph, as compiled: {"prefill": "dense", "decode": "gather"}
    config: DbrxConfig
    formats: list[str]                # "aoti", "onnx"
    graphs: dict[str, dict]           # name -> {"inputs": [...], "outputs": [...], "aoti": path, "onnx": path}
    weights: dict[str, str]           # graph tensor name -> file under weights/ (tp 1; {} under --tp N)
    tokenizer: dict
    files: dict[str, dict]            # relative path -> {"sha256": ..., "bytes": ...}
    weights_format: str = "same"      # how the matrices are stored: same (as dtype), bfloat16, int8
    onnx_accuracy_level: int | None = None  # int8 ONNX linear layers as MatMulNBits at this level (4)
    attention: str = "math"           # as requested (auto, math, sdpa); per graph as compiled: graphs[g]["aoti_attention"]
    moe_kernel: str = "auto"          # as requested (auto, inductor, triton); per graph: graphs[g]["aoti_moe_kernel"]
    tp: int = 1                       # tensor-parallel degree: ranks that run the graphs together (torchrun)
    tp_group: str | None = None       # the process group name the packages' collectives were compiled with
    rank_weights: list[dict[str, str]] = dataclasses.field(default_factory=list)  # tp > 1: per rank, as weights

    # -- writing ---------------------------------------------------------------------------------

    def to_json(self) -> dict:
        data = dataclasses.asdict(self)
        data["config"] = self.config.to_dict()
        return {"format": FORMAT, **data}

    def write(self, root: Path) -> None:
        (root / MANIFEST).write_text(json.dumps(self.to_json(), indent=2) + "\n")

    # -- reading ---------------------------------------------------------------------------------

    @classmethod
    def read(cls, root: Path) -> Manifest:
        path = Path(root) / MANIFEST
        if not path.is_file():
            raise DbrxAotError(f"{root}: no {MANIFEST} (not a dbrx-aot artifact directory)")
        data = read_json(path)
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise DbrxAotError(f"{path}: format={data.get('format') if isinstance(data, dict) else None!r}, "
                               f"expected {FORMAT!r}")
        version = data.get("format_version")
        if version != FORMAT_VERSION:
            raise DbrxAotError(f"{path}: format_version={version!r}, this dbrx-aot reads version "
                               f"{FORMAT_VERSION} (re-export the artifact with this version)")
        fields = {f.name for f in dataclasses.fields(cls)}
        required = {f.name for f in dataclasses.fields(cls)
                    if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING}
        missing = sorted(required - set(data))
        if missing:
            raise DbrxAotError(f"{path}: missing key {missing[0]}")
        data = {k: v for k, v in data.items() if k in fields}
        data["config"] = DbrxConfig(**data["config"])
        return cls(**data)

    def tokenizer_obj(self) -> Tokenizer:
        t = self.tokenizer
        return Tokenizer(t["chat_template"], eos_ids=tuple(t["eos_ids"]), pad_id=t["pad_id"], bos_id=t["bos_id"])

    def weights_of(self, rank: int = 0) -> dict[str, str]:
        """{graph tensor name: file under weights/} of one rank's shard (the only one when tp is 1)."""
        if self.tp == 1:
            return self.weights
        return self.rank_weights[rank] if self.rank_weights else {}  # none: exported with --skip-weights

    def has_weights(self) -> bool:
        return bool(self.weights_of(0))

    def weight_files(self, rank: int = 0) -> list[str]:
        """One rank's weight files, relative to the artifact root."""
        return sorted({f"{WEIGHTS_DIR}/{f}" for f in self.weights_of(rank).values()})

    def torch_dtype(self) -> torch.dtype:
        return parse_dtype(self.dtype)

    def onnx_moe(self, graph: str) -> str:
        """The MoE form of this artifact's ONNX graph ``graph``: its own (graphs[graph].onnx_moe), or
        moe_modes' in artifacts written before the formats' forms could differ."""
        return self.graphs[graph].get("onnx_moe", self.moe_modes[graph])

    def verify_files(self, root: Path, names: list[str] | None = None, checksums: bool = True,
                     progress: bool = True) -> None:
        """Every listed file present with its size, and (unless disabled) its sha256."""
        items = [(rel, info) for rel, info in self.files.items() if names is None or rel in names]
        bar = tqdm(total=sum(info["bytes"] for _, info in items), desc="verifying checksums", unit="B",
                   unit_scale=True, disable=not (progress and checksums))
        for rel, info in items:
            path = root / rel
            if not path.is_file():
                raise DbrxAotError(f"{path}: missing (listed in {MANIFEST})")
            size = path.stat().st_size
            if size != info["bytes"]:
                raise DbrxAotError(f"{path}: {size} bytes, expected {info['bytes']} from {MANIFEST} "
                                   "(truncated or replaced)")
            if checksums and sha256_file(path, bar.update) != info["sha256"]:
                raise DbrxAotError(f"{path}: sha256 does not match {MANIFEST} (the file was modified or corrupted; "
                                   "re-export, or pass --no-verify-checksums to skip the check)")
        bar.close()

    def iter_weights(self, root: Path, progress: bool = True, rank: int = 0) -> Iterator[tuple[str, torch.Tensor]]:
        """(graph name, tensor as stored) from weights/ (rank ``rank``'s shard), one tensor at a time."""
        weights = self.weights_of(rank)
        by_file: dict[str, list[str]] = {}
        for name, file in weights.items():
            by_file.setdefault(file, []).append(name)
        bar = tqdm(total=len(weights), desc="loading weights", unit="tensor", disable=not progress)
        for file, names in by_file.items():
            path = root / WEIGHTS_DIR / file
            with open_checked(path) as f:
                present = set(f.keys())
                for name in names:
                    if name not in present:
                        raise DbrxAotError(f"{path}: missing tensor {name} (listed in {MANIFEST})")
                    yield name, read_tensor(f, path, name)
                    bar.update()
        bar.close()


def sha256_file(path: Path, update=None, block: int = 1 << 24) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(block):
            digest.update(chunk)
            if update is not None:
                update(len(chunk))
    return digest.hexdigest()
