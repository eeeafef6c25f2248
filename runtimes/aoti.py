"""The AOTInductor runtime: two compiled packages sharing one copy of the weights.

The manifest is checked first (format, torch version, device, files and checksums); then the
weights are read once onto the device and bound to both packages as user-managed constants
(the packages keep pointers, no copies). A package compiled without its constants must never
run before they are bound (it would crash), so binding happens in ``load``, always.
"""

from __future__ import annotations

from pathlib import Path

import torch

from dbrx_aot.errors import DbrxAotError
from dbrx_aot.export.manifest import Manifest
from dbrx_aot.runtimes import KVCache, RuntimeBase, resolve_device

CONSTANT_PREFIX = "model."  # the compiled module wraps the model as ``model`` (export/aoti.py)


def check_artifact(manifest: Manifest, root: Path, fmt: str) -> None:
    """The checks every compiled-artifact runtime shares: the format is there, and weights."""
    if fmt not in manifest.formats:
        raise DbrxAotError(f"{root}: holds {', '.join(manifest.formats)}, not {fmt} (re-export with "
                           f"--format {fmt})")
    if not manifest.weights:
        raise DbrxAotError(f"{root}: exported with --skip-weights (compile-only); it has no weights to run")


class AotiRuntime(RuntimeBase):
    name = "aoti"

    @classmethod
    def load(cls, path: Path, device="cpu", verify_checksums: bool = True, progress: bool = True) -> AotiRuntime:
        path = Path(path)
        manifest = Manifest.read(path)
        dev = resolve_device(device)
        check_artifact(manifest, path, "aoti")
        built = manifest.versions.get("torch")
        if built != torch.__version__:
            raise DbrxAotError(f"{path}: AOTInductor packages built by torch {built}, this is torch "
                               f"{torch.__version__}; a package loads only under the torch that built it "
                               "(re-export here, or use --runtime eager / onnxruntime)")
        if manifest.device != dev.type:
            raise DbrxAotError(f"{path}: compiled for {manifest.device}, asked to run on {dev.type} "
                               f"(re-export with --device {dev.type})")
        packages = [manifest.graphs[g]["aoti"] for g in ("prefill", "decode")]
        weight_files = sorted({f"weights/{f}" for f in manifest.weights.values()})
        manifest.verify_files(path, packages + weight_files, checksums=verify_checksums, progress=progress)
        return cls(path, manifest, dev, progress)

    def __init__(self, path: Path, manifest: Manifest, device: torch.device, progress: bool = True):
        self.path = path
        self.manifest = manifest
        self.config = manifest.config
        self.tokenizer = manifest.tokenizer_obj()
        self.device = device
        self.dtype = manifest.torch_dtype()
        self.batch_size, self.max_seq_len = manifest.batch_size, manifest.max_seq_len
        self.prefill_chunk = manifest.prefill_chunk
        self.decode_moe = manifest.moe_modes["decode"]
        # One copy of the weights, on the device, shared by both packages.
        self.weights = {name: tensor.to(device) for name, tensor in manifest.iter_weights(path, progress=progress)}
        self._prefill = self._load_package("prefill")
        self._decode = self._load_package("decode")

    def _load_package(self, graph: str):
        package = self.path / self.manifest.graphs[graph]["aoti"]
        try:
            runner = torch._inductor.aoti_load_package(str(package))
        except Exception as err:  # the loader raises RuntimeError and friends with C++ messages
            raise DbrxAotError(f"{package}: AOTInductor could not load it ({str(err).splitlines()[0]})") from None
        fqns = runner.get_constant_fqns()
        missing = [f for f in fqns if f.removeprefix(CONSTANT_PREFIX) not in self.weights]
        if missing:
            raise DbrxAotError(f"{package}: needs constant {missing[0]}, which weights/ does not hold")
        runner.load_constants({f: self.weights[f.removeprefix(CONSTANT_PREFIX)] for f in fqns},
                              check_full_update=True, user_managed=True)
        return runner

    @torch.inference_mode()
    def prefill(self, tokens: torch.Tensor, positions: torch.Tensor, cache: KVCache) -> torch.Tensor:
        tokens, positions = self.check_call(tokens, positions, cache, self.prefill_chunk)
        return self._prefill(tokens, positions, cache.k, cache.v)

    @torch.inference_mode()
    def decode(self, tokens: torch.Tensor, positions: torch.Tensor, cache: KVCache) -> torch.Tensor:
        tokens, positions = self.check_call(tokens, positions, cache, 1)
        return self._decode(tokens, positions, cache.k, cache.v)
