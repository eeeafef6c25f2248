"""AOTInductor packaging: one .pt2 per graph, compiled with the weights kept out of the .so.

The packages receive the weights at load time (``load_constants(..., user_managed=True)``), so
prefill and decode share one copy of them, the artifact's weights/.
"""

from __future__ import annotations

import contextlib
import copy
import fcntl
import hashlib
import logging
import os
import shlex
import shutil
import sys
import tempfile
from pathlib import Path

import torch
import torch._inductor
from torch._inductor.cpp_builder import get_cpp_compiler
from torch._inductor.runtime.cache_dir_utils import cache_dir

from dbrx_aot.model import DbrxModel, use_attention_extents, use_rowdot, use_sdpa, use_triton_gather
from dbrx_aot.export.trace import GraphSpec, export_program, torch_deprecations_hidden

INDUCTOR_CONFIGS = {
    "aot_inductor.package_constants_in_so": False,  # weights live once, in weights/
}

log = logging.getLogger("dbrx_aot")

# What a package's .so exports: AOTInductor's C API, every entry point its loaders look up. The
# rest (hundreds of C++ template instances Inductor's runtime headers make: std::regex's among
# them, which libtorch and libc10 export too, built by another compiler) binds inside the .so,
# never to a host library's copy, nor the host's to it.
C_API_ONLY = "{ global: AOTInductor*; local: *; };\n"
# And the C++ runtime it runs: the compiler's own libstdc++, linked in (and kept local by the version
# script), so the .so's inline std:: code (std::regex, use_facet) runs on the library its headers
# describe, whatever libstdc++ copies the process's libraries bring. Its imports are then C only
# (libtorch's C shim, libc, libgcc_s). Where that link fails (no libstdc++.a), it links dynamically.
LINKING_C_API_ONLY = """#!/bin/sh
# dbrx-aot (export/aoti.py): {compiler}, linking shared libraries that export only AOTInductor's C API
case " $* " in
  *" -shared "*)
    {compiler} "$@" -static-libstdc++ -Wl,--version-script={version_script} && exit 0
    echo "dbrx-aot: linking libstdc++ statically failed; linking it dynamically" >&2
    exec {compiler} "$@" -Wl,--version-script={version_script} ;;
  *) exec {compiler} "$@" ;;
esac
"""


def c_api_only_compiler() -> str | None:
    """A C++ compiler for Inductor that is the one it would run (``g++``, or $CXX), save that a shared
    library it links gets C_API_ONLY as its version script and libstdc++ linked in: a script in
    Inductor's cache directory, at a path fixed by what it runs (so that Inductor's caches keep
    hitting), named as the compiler is (Inductor tells GCC from Clang by the name). None off Linux
    (GNU linkers only)."""
    if not sys.platform.startswith("linux"):
        return None
    compiler = get_cpp_compiler()
    real = shutil.which(compiler) or compiler
    key = "\0".join((real, C_API_ONLY, LINKING_C_API_ONLY)).encode()
    folder = Path(cache_dir()).resolve() / "dbrx-aot-cxx" / hashlib.sha256(key).hexdigest()[:16]
    version_script, path = folder / "c-api-only.map", folder / Path(compiler).name
    if not path.is_file():
        folder.mkdir(parents=True, exist_ok=True)
        script = LINKING_C_API_ONLY.format(compiler=shlex.quote(real), version_script=shlex.quote(str(version_script)))
        for target, text, mode in ((version_script, C_API_ONLY, 0o644), (path, script, 0o755)):
            # Written whole, then renamed (the script last): a compile beside this one never runs half of it.
            fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-")
            with os.fdopen(fd, "w") as f:
                f.write(text)
            os.chmod(tmp, mode)
            os.replace(tmp, target)
    return str(path)


def inductor_configs() -> dict:
    """The Inductor configuration every package of an artifact is compiled with."""
    compiler = c_api_only_compiler()
    return {**INDUCTOR_CONFIGS, **({"cpp.cxx": (compiler,)} if compiler else {})}


@contextlib.contextmanager
def compile_lock():
    """Held while a package is compiled: one compile at a time per Inductor cache directory.

    AOTInductor builds a graph in <cache>/<hash of the graph's code>/ and packages the .pt2 from
    there after releasing its own lock, so two processes compiling the same graph at once (two
    exports, or the GPU check's slices, whose decode graphs are alike) can zip a .so the other is
    rewriting. Processes with their own ``TORCHINDUCTOR_CACHE_DIR`` compile in parallel."""
    path = Path(cache_dir()) / "dbrx-aot-compile.lock"
    with open(path, "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.info("waiting for another process's compile in %s (set TORCHINDUCTOR_CACHE_DIR per "
                     "process to compile in parallel)", path.parent)
            fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def resolve_linear(spec: GraphSpec, batch_size: int, device: torch.device, weights_format: str) -> str:
    """How the graph's projections multiply: ``rowdot`` (model.rowdot: a fused multiply + row
    reduction) for one-token CPU decode at batch 1 when the matrices are stored narrower than the
    compute dtype (``--weights bfloat16`` or ``int8``): the kernel upcasts or dequantises each weight
    as it streams it, where a BLAS product would first write the whole matrix out in fp32. ``mm``
    (BLAS) otherwise: on weights already in the compute dtype, MKL's matrix-vector product streams
    faster than Inductor's row reduction (small preset fp32 decode, S=2048, 2 cores: 17.9 vs 21.7 ms
    a step; lm_head alone 5.2-5.7 vs 8.0 ms)."""
    narrow = weights_format != "same"
    return "rowdot" if device.type == "cpu" and spec.tokens == 1 and batch_size == 1 and narrow else "mm"


def compile_package(model: DbrxModel, spec: GraphSpec, batch_size: int, max_seq_len: int, out: Path,
                    attention: str = "math", linear: str = "mm", extents: tuple[int, ...] = (),
                    moe_kernel: str = "inductor") -> Path:
    """torch.export the in-place-cache graph and compile it into ``out`` (.pt2); ``attention``:
    ``math`` or ``sdpa`` (trace.resolve_attention); ``linear``: ``mm`` or ``rowdot`` (resolve_linear);
    ``extents``: the cache extents its attention may stay within (trace.attention_extents);
    ``moe_kernel``: ``inductor`` or ``triton`` (trace.resolve_moe_kernel)."""
    rowdot = linear == "rowdot"
    if rowdot or attention == "sdpa" or extents or moe_kernel == "triton":
        # A structural copy sharing the same parameters (no weight is copied).
        model = copy.deepcopy(model, memo={id(p): p for p in model.parameters()})
        if rowdot:
            use_rowdot(model)
        if attention == "sdpa":
            use_sdpa(model)
        if extents:
            use_attention_extents(model, extents)
        if moe_kernel == "triton":
            use_triton_gather(model)
    program = export_program(model, spec, batch_size, max_seq_len)
    out.parent.mkdir(parents=True, exist_ok=True)
    with torch.no_grad(), torch_deprecations_hidden(), compile_lock():
        path = torch._inductor.aoti_compile_and_package(program, package_path=str(out),
                                                        inductor_configs=inductor_configs())
    return Path(path)
