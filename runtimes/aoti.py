"""The AOTInductor runtime: two compiled packages sharing one copy of the weights.

The manifest is checked first (format, torch version, device, files and checksums); then the
weights are read once onto the device and bound to both packages as user-managed constants
(the packages keep pointers, no copies). A package compiled without its constants must never
run before they are bound (it would crash), so binding happens in ``load``, always.

On CUDA, decode replays a captured CUDA graph per KV cache (runtimes/cuda_graphs.py) unless
``cuda_graphs=False``. ``random_weights=SEED`` binds random weights made on the device instead of
reading weights/ (benchmarks of compile-only artifacts: speed does not depend on the values).
"""

from __future__ import annotations

from pathlib import Path

import torch

from dbrx_aot.checkpoint import random_weights as make_random_weights
from dbrx_aot.errors import DbrxAotError
from dbrx_aot.manifest import Manifest
from dbrx_aot.model import STEP_PREFIX
from dbrx_aot.runtimes import KVCache
from dbrx_aot.runtimes.artifact import ArtifactRuntime, open_artifact, verify_artifact_files
from dbrx_aot.runtimes.cuda_graphs import DecodeGraphs
from dbrx_aot.tp import shard


class AotiRuntime(ArtifactRuntime):
    name = "aoti"

    @classmethod
    def load(cls, path: Path, device="cpu", verify_checksums: bool = True, progress: bool = True,
             cuda_graphs: bool | None = None, random_weights: int | None = None) -> AotiRuntime:
        """``cuda_graphs``: None is on for CUDA (single-process artifacts) and off for CPU; True on CPU
        is an error."""
        path = Path(path)
        manifest, dev, rank = open_artifact(path, "aoti", device, need_weights=random_weights is None)
        if cuda_graphs is None:  # not yet with collectives inside (never seen on NCCL): pass True to try
            cuda_graphs = dev.type == "cuda" and manifest.tp == 1
        elif cuda_graphs and dev.type != "cuda":
            raise DbrxAotError(f"cuda_graphs=True: CUDA graphs need a CUDA device, this runtime is on {dev} "
                               "(leave the option unset, or pass False)")
        built = manifest.versions.get("torch")
        if built != torch.__version__:
            raise DbrxAotError(f"{path}: AOTInductor packages built by torch {built}, this is torch "
                               f"{torch.__version__}; a package loads only under the torch that built it "
                               "(re-export here, or use --runtime eager / onnxruntime)")
        if manifest.device != dev.type:
            raise DbrxAotError(f"{path}: compiled for {manifest.device}, asked to run on {dev.type} "
                               f"(re-export with --device {dev.type})")
        verify_artifact_files(manifest, path, "aoti", verify_checksums, progress,
                              weights=random_weights is None, rank=rank)
        return cls(path, manifest, dev, progress, cuda_graphs=cuda_graphs, random_weights=random_weights, rank=rank)

    def __init__(self, path: Path, manifest: Manifest, device: torch.device, progress: bool = True,
                 cuda_graphs: bool = False, random_weights: int | None = None, rank: int = 0):
        super().__init__(path, manifest, device, rank)
        # One copy of the weights (this rank's shard), on the device, shared by both packages.
        if random_weights is None:
            weights = manifest.iter_weights(path, progress=progress, rank=rank)
        else:
            weights = ((name, shard(name, tensor, rank, self.tp, self.config)) for name, tensor in
                       make_random_weights(self.config, self.dtype, device, seed=random_weights,
                                           weights_format=manifest.weights_format))
        self.weights = {name: tensor.to(device) for name, tensor in weights}
        self._prefill = self._load_package("prefill")
        # A graph capture needs the package to run on the caller's stream without its own threading.
        self._decode = self._load_package("decode", run_single_threaded=cuda_graphs)
        self.decode_graphs = DecodeGraphs(self._decode) if cuda_graphs else None

    @property
    def cuda_graphs(self) -> bool:
        return self.decode_graphs is not None

    def _load_package(self, graph: str, run_single_threaded: bool = False):
        package = self.path / self.manifest.graphs[graph]["aoti"]
        try:
            runner = torch._inductor.aoti_load_package(str(package), run_single_threaded=run_single_threaded,
                                                       device_index=self.device.index if self.device.type == "cuda"
                                                       else -1)
        except Exception as err:  # the loader raises RuntimeError and friends with C++ messages
            raise DbrxAotError(f"{package}: AOTInductor could not load it ({str(err).splitlines()[0]})") from None
        fqns = runner.get_constant_fqns()
        missing = [f for f in fqns if f.removeprefix(STEP_PREFIX) not in self.weights]
        if missing:
            raise DbrxAotError(f"{package}: needs constant {missing[0]}, which weights/ does not hold")
        runner.load_constants({f: self.weights[f.removeprefix(STEP_PREFIX)] for f in fqns},
                              check_full_update=True, user_managed=True)
        return runner

    def run_graph(self, graph: str, tokens: torch.Tensor, positions: torch.Tensor, cache: KVCache,
                  logit_index: torch.Tensor | None = None) -> torch.Tensor:
        if graph == "prefill":
            return self._prefill(tokens, positions, cache.k, cache.v, logit_index)
        if self.decode_graphs is not None:
            return self.decode_graphs(tokens, positions, cache)
        return self._decode(tokens, positions, cache.k, cache.v)
