"""The AOTInductor runtime: two compiled packages sharing one copy of the weights.

The manifest is checked first (format, torch version, device, files and checksums); then the
weights are read once onto the device and bound to both packages as user-managed constants
(the packages keep pointers, no copies). A package compiled without its constants must never
run before they are bound (it would crash), so binding happens in ``load``, always.

On CUDA, decode replays a captured CUDA graph per KV cache (runtimes/cuda_graphs.py) unless
``cuda_graphs=False``. ``random_weights=SEED`` binds random weights made on the device instead of
reading weights/ (benchmarks of compile-only artifacts: speed does not depend on the values).

A package is opened by torch's package loader (``package_loader``: as ``aoti_load_package`` opens
it, its metadata checked against this machine by ``compiled_elsewhere``), or, with the environment
variable ``DBRX_AOT_AOTI_LOADER=container`` (or ``deepbind``), by AOTInductor's container runner
alone on the .so extracted from it (``open_package``): ways round an image where a fresh process
crashes loading a CUDA package (README, GPU check).
"""

from __future__ import annotations

import ctypes
import logging
import os
import platform
import sys
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

log = logging.getLogger("dbrx_aot")

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


def compiled_here(device: torch.device) -> dict[str, str]:
    """What a package's metadata says it was compiled for (AOTI_*), read off this process without
    building anything: Inductor's own reading (codecache.get_device_information, the first step of
    aoti_load_package) builds and loads a test library per CPU ISA, each in a new python that imports
    torch: 10 s of an 11 s load_runtime under torch 2.11 on 2 cores, at least 23 s a process on the H200."""
    here = {"AOTI_PLATFORM": sys.platform, "AOTI_MACHINE": platform.machine()}
    try:  # an x86 CPU's vector ISAs, in Inductor's words (its cpuid checks, no build)
        from torch._inductor.cpu_vec_isa import x86_isa_checker
    except ImportError:
        pass
    else:
        if here["AOTI_MACHINE"] in ("x86_64", "AMD64"):
            here["AOTI_CPU_ISA"] = " ".join(x86_isa_checker()).upper()
    if device.type == "cuda" and torch.version.hip is None:  # ROCm's packages name a gfx architecture
        major, minor = torch.cuda.get_device_capability(device)
        here["AOTI_COMPUTE_CAPABILITY"] = str(major * 10 + minor)
    return here


def compiled_elsewhere(meta: dict[str, str], here: dict[str, str]) -> tuple[list[str], list[str]]:
    """(what keeps a package from running here, what may slow it) from its metadata against
    compiled_here: another platform or machine, CPU kernels for vector instructions this CPU lacks
    (they would die of SIGILL), CUDA kernels for another GPU generation; a newer GPU of the same
    generation only a warning (cubins run on later GPUs of their generation; Inductor's own check
    only ever warns)."""
    fatal, warnings = [], []
    for key, what in (("AOTI_PLATFORM", "platform"), ("AOTI_MACHINE", "machine")):
        if meta.get(key) and meta[key] != here[key]:
            fatal.append(f"compiled for {what} {meta[key]}, this is {here[key]}")
    wanted = set(meta.get("AOTI_CPU_ISA", "").split()) - {"INVALID_VEC_ISA"}  # that one: no vector code
    missing = wanted - set(here["AOTI_CPU_ISA"].split()) if "AOTI_CPU_ISA" in here else set()
    if missing:
        (fatal if meta.get("AOTI_DEVICE_KEY") == "cpu" else warnings).append(
            f"compiled for a CPU with {meta['AOTI_CPU_ISA']}, this one lacks {' '.join(sorted(missing))}")
    built, gpu = meta.get("AOTI_COMPUTE_CAPABILITY", ""), here.get("AOTI_COMPUTE_CAPABILITY", "")
    if built.isdigit() and gpu.isdigit() and built != gpu:
        (built_major, built_minor), (major, minor) = divmod(int(built), 10), divmod(int(gpu), 10)
        (warnings if major == built_major and minor > built_minor else fatal).append(
            f"compiled for a GPU of compute capability {built_major}.{built_minor}, this one is {major}.{minor}")
    return fatal, warnings


def check_compiled_for_here(package: Path, device: torch.device) -> None:
    """The package's metadata against compiled_here: an error for what cannot run here, a warning
    for what may run slower (in place of aoti_load_package's own check, a warning only)."""
    read = getattr(torch._C._aoti.AOTIModelPackageLoader, "load_metadata_from_package", None)
    if read is None:  # a torch without it (aoti_load_package's own check reads the metadata with it too)
        return
    fatal, warnings = compiled_elsewhere(read(str(package), "model"), compiled_here(device))
    if fatal:
        raise DbrxAotError(f"{package}: {fatal[0]} (re-export on this machine)")
    for warning in warnings:
        log.warning("%s: %s", package, warning)


def package_loader(package: Path, device: torch.device, run_single_threaded: bool):
    """The .pt2 opened by torch's package loader (AOTIModelPackageLoader) as aoti_load_package opens
    it, less that function's first step (its reading of the machine: check_compiled_for_here does
    that job). On a torch whose loader has another form, aoti_load_package itself."""
    index = -1 if device.index is None else device.index
    try:
        from torch.export.pt2_archive._package import AOTICompiledModel

        return AOTICompiledModel(torch._C._aoti.AOTIModelPackageLoader(str(package), "model", run_single_threaded, 1,
                                                                       index))
    except (ImportError, TypeError):  # TypeError: the loader takes other arguments there
        return torch._inductor.aoti_load_package(str(package), run_single_threaded=run_single_threaded,
                                                 device_index=index)


def open_package(package: Path, device: torch.device, run_single_threaded: bool = False):
    """One .pt2 opened the way DBRX_AOT_AOTI_LOADER says (package loader by default); not yet bound."""
    loader = os.environ.get("DBRX_AOT_AOTI_LOADER", "package")
    if loader not in AOTI_LOADERS:
        raise DbrxAotError(f"DBRX_AOT_AOTI_LOADER={loader!r}: expected one of {', '.join(AOTI_LOADERS)}")
    try:
        check_compiled_for_here(package, device)
        if loader in ("container", "deepbind"):
            return ContainerPackage(package, device, run_single_threaded, loader)
        return package_loader(package, device, run_single_threaded)
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
