"""The AOTInductor runtime: two compiled packages sharing one copy of the weights.

The manifest is checked first (format, torch version, device, files and checksums); then the
weights are read once onto the device and bound to both packages as user-managed constants
(the packages keep pointers, no copies). A package compiled without its constants must never
run before they are bound (it would crash), so binding happens in ``load``, always.

On CUDA, decode replays a captured CUDA graph per KV cache (runtimes/cuda_graphs.py) unless
``cuda_graphs=False``. ``random_weights=SEED`` binds random weights made on the device instead of
reading weights/ (benchmarks of compile-only artifacts: speed does not depend on the values).

A package is opened by torch's package loader (``aoti_load_package``), or, with the environment
variable ``DBRX_AOT_AOTI_LOADER=container`` (or ``deepbind``), by AOTInductor's container runner
alone on the .so extracted from it (``open_package``): ways round an image where a fresh process
crashes loading a CUDA package (README, GPU check).
"""

from __future__ import annotations

import ctypes
import os
import tempfile
import zipfile
from pathlib import Path

import torch
import torch.utils._pytree as pytree

from dbrx_aot.checkpoint import random_weights as make_random_weights
from dbrx_aot.errors import DbrxAotError
from dbrx_aot.manifest import Manifest
from dbrx_aot.model import STEP_PREFIX
from dbrx_aot.runtimes import KVCache
from dbrx_aot.runtimes.artifact import ArtifactRuntime, open_artifact, verify_artifact_files
from dbrx_aot.runtimes.cuda_graphs import DecodeGraphs
from dbrx_aot.tp import shard


# DBRX_AOT_AOTI_LOADER: what opens a package. "package" (the default): torch's AOTIModelPackageLoader.
# "container": the .so extracted and opened by AOTIModelContainerRunner{Cpu,Cuda}, as
# torch._export.aot_load opens a .so (on the H200, every process that had not compiled a CUDA
# package died of SIGSEGV inside the package loader's constructor; see README, GPU check).
# "deepbind": as "container", the .so first opened with RTLD_DEEPBIND, so that its symbols bind to
# its own dependencies (libstdc++) ahead of any library loaded into the process's global scope (the
# third H200 run's crash was in std::regex's locale lookup inside the .so's constructor).
AOTI_LOADERS = ("package", "container", "deepbind")


class ContainerPackage:
    """A .pt2 opened without torch's package loader: what this runtime asks of a loaded package
    (``get_constant_fqns``, ``load_constants``, the call), on AOTInductor's container runner. The
    extracted files (the .so, and on CUDA its cubins) live as long as this object."""

    def __init__(self, package: Path, device: torch.device, run_single_threaded: bool = False,
                 loader: str = "container"):
        self._files = tempfile.TemporaryDirectory(prefix="dbrx-aot-aoti-")
        root = Path(self._files.name)
        with zipfile.ZipFile(package) as archive:
            archive.extractall(root)
        so = next(root.rglob("*.wrapper.so"), None) or next(root.rglob("*.so"), None)  # the model's, not a kernel's
        if so is None:
            raise DbrxAotError(f"{package}: holds no compiled .so (DBRX_AOT_AOTI_LOADER={loader} opens only that)")
        # Opened here first, the runner's own dlopen of the same path gets this handle, bound as asked.
        self._deepbound = ctypes.CDLL(str(so), os.RTLD_NOW | os.RTLD_DEEPBIND) if loader == "deepbind" else None
        aoti = torch._C._aoti
        if device.type == "cpu":
            self.runner = aoti.AOTIModelContainerRunnerCpu(str(so), 1)
        elif not run_single_threaded:
            self.runner = aoti.AOTIModelContainerRunnerCuda(str(so), 1, str(device), str(so.parent))
        else:
            try:  # its cubins beside it; single-threaded, so that a CUDA graph can capture its run
                self.runner = aoti.AOTIModelContainerRunnerCuda(str(so), 1, str(device), str(so.parent), True)
            except TypeError:
                raise DbrxAotError(f"{package}: torch {torch.__version__}'s container runner cannot run "
                                   "single-threaded, which a CUDA graph capture needs (turn CUDA graphs off, or "
                                   "unset DBRX_AOT_AOTI_LOADER)") from None
        self._names = self.runner.get_constant_names_to_original_fqns()  # the runner's name -> fqn
        self._out_spec = pytree.treespec_loads(self.runner.get_call_spec()[1])

    def get_constant_fqns(self) -> list[str]:
        return list(self._names.values())

    def load_constants(self, weights: dict[str, torch.Tensor], check_full_update: bool, user_managed: bool) -> None:
        by_name = {name: weights[fqn] for name, fqn in self._names.items()}
        self.runner.update_constant_buffer(by_name, False, check_full_update, user_managed)

    def __call__(self, *args: torch.Tensor | None):
        # As the package loader's call: the tensors of the flattened arguments (a None is no input).
        flat = [x for x in pytree.tree_leaves(args) if isinstance(x, torch.Tensor)]
        return pytree.tree_unflatten(self.runner.run(flat), self._out_spec)


def open_package(package: Path, device: torch.device, run_single_threaded: bool = False):
    """One .pt2 opened the way DBRX_AOT_AOTI_LOADER says (package loader by default); not yet bound."""
    loader = os.environ.get("DBRX_AOT_AOTI_LOADER", "package")
    if loader not in AOTI_LOADERS:
        raise DbrxAotError(f"DBRX_AOT_AOTI_LOADER={loader!r}: expected one of {', '.join(AOTI_LOADERS)}")
    try:
        if loader in ("container", "deepbind"):
            return ContainerPackage(package, device, run_single_threaded, loader)
        return torch._inductor.aoti_load_package(str(package), run_single_threaded=run_single_threaded,
                                                 device_index=-1 if device.index is None else device.index)
    except DbrxAotError:
        raise
    except Exception as err:  # the loaders raise RuntimeError and friends with C++ messages
        raise DbrxAotError(f"{package}: AOTInductor could not load it ({str(err).splitlines()[0]})") from None


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
        runner = open_package(package, self.device, run_single_threaded)
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
