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
from dbrx_aot.model import STEP_PREFIX
from dbrx_aot.runtimes import KVCache
from dbrx_aot.runtimes.artifact import ArtifactRuntime, open_artifact, verify_artifact_files

class AotiRuntime(ArtifactRuntime):
    name = "aoti"

    @classmethod
    def load(cls, path: Path, device="cpu", verify_checksums: bool = True, progress: bool = True) -> AotiRuntime:
        path = Path(path)
        manifest, dev = open_artifact(path, "aoti", device)
        built = manifest.versions.get("torch")
        if built != torch.__version__:
            raise DbrxAotError(f"{path}: AOTInductor packages built by torch {built}, this is torch "
                               f"{torch.__version__}; a package loads only under the torch that built it "
                               "(re-export here, or use --runtime eager / onnxruntime)")
        if manifest.device != dev.type:
            raise DbrxAotError(f"{path}: compiled for {manifest.device}, asked to run on {dev.type} "
                               f"(re-export with --device {dev.type})")
        verify_artifact_files(manifest, path, "aoti", verify_checksums, progress)
        return cls(path, manifest, dev, progress)

    def __init__(self, path: Path, manifest: Manifest, device: torch.device, progress: bool = True):
        super().__init__(path, manifest, device)
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
        missing = [f for f in fqns if f.removeprefix(STEP_PREFIX) not in self.weights]
        if missing:
            raise DbrxAotError(f"{package}: needs constant {missing[0]}, which weights/ does not hold")
        runner.load_constants({f: self.weights[f.removeprefix(STEP_PREFIX)] for f in fqns},
                              check_full_update=True, user_managed=True)
        return runner

    def run_graph(self, graph: str, tokens: torch.Tensor, positions: torch.Tensor, cache: KVCache) -> torch.Tensor:
        runner = self._prefill if graph == "prefill" else self._decode
        return runner(tokens, positions, cache.k, cache.v)
