"""Shared fixtures: random checkpoints in the real hub layout, built once per session."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dbrx_aot.checkpoint import write_random_checkpoint
from dbrx_aot.config import DbrxConfig, preset
from dbrx_aot.verify import TOLERANCES


def load_script(name: str):
    """scripts/NAME.py as a module (developer tools are not part of the package)."""
    spec = importlib.util.spec_from_file_location(name, Path(__file__).resolve().parent.parent / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module

# The package's one tolerance table, as max absolute logit error keyed by (runtime, torch dtype).
TOLERANCE = {(runtime, getattr(torch, dtype)): tol.max_abs for (runtime, dtype), tol in TOLERANCES.items()
             if hasattr(torch, dtype)}

# A small-vocabulary base for parity configs; each case overrides a few fields.
BASE = dict(d_model=64, n_heads=4, n_layers=2, vocab_size=256, max_seq_len=128, kv_n_heads=2, clip_qkv=8.0,
            rope_theta=500000.0, ffn_hidden_size=48, moe_num_experts=8, moe_top_k=2,
            moe_normalize_expert_weights=1.0)

PARITY_CASES = {
    "base": {},
    "clip_none_mha": dict(clip_qkv=None, kv_n_heads=4),
    "clip_active_mqa": dict(clip_qkv=0.5, kv_n_heads=1),
    "norm_none_top1": dict(moe_normalize_expert_weights=None, moe_top_k=1),
    "norm_p2": dict(moe_normalize_expert_weights=2.0, moe_top_k=3),
    "topk_all_odd": dict(d_model=36, n_heads=3, kv_n_heads=1, ffn_hidden_size=20, vocab_size=211,
                         moe_num_experts=5, moe_top_k=5, n_layers=3, rope_theta=10000.0),
}


def parity_config(case: str) -> DbrxConfig:
    return DbrxConfig(**{**BASE, **PARITY_CASES[case]})


def make_checkpoint(root: Path, config: DbrxConfig, seed: int = 0, shards: int = 2,
                    dtype: torch.dtype = torch.float32) -> Path:
    return write_random_checkpoint(root, config, seed=seed, shards=shards, dtype=dtype, progress=False)


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    """The tiny preset (real vocabulary), three shards, bf16 on disk as the released model."""
    return write_random_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny", preset("tiny"), seed=0, shards=3,
                                   progress=False)


@pytest.fixture(scope="session")
def parity_checkpoints(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("parity")
    return {case: make_checkpoint(root / case, parity_config(case), seed=n)
            for n, case in enumerate(PARITY_CASES)}


def edit_json(path: Path, **changes) -> None:
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


def replace_config(config: DbrxConfig, **changes) -> DbrxConfig:
    return dataclasses.replace(config, **changes)


ARTIFACT_SHAPES = dict(batch_size=2, max_seq_len=64, prefill_chunk=8)
ARTIFACT_FORMATS = "aoti,onnx"

# An export compiles on one core (97% of one of this machine's two: Inductor runs its C++ compiler on
# one file at a time), and the session fixtures' exports are the suite's longest minutes.
EXPORT_LANES = 2
EXPORT_LANE = """
import json, sys
from dbrx_aot.export import export_artifact
for job in json.loads(sys.argv[1]):
    export_artifact(**job, progress=False)
"""


def export_side_by_side(checkpoint: Path, root: Path, builds: dict[str, dict]) -> dict[str, Path]:
    """``export_artifact(checkpoint, root / name, **options)`` for each build, in EXPORT_LANES processes
    side by side, builds dealt to them in turn. Within one Inductor cache, export.aoti.compile_lock lets
    one process compile at a time: the first lane compiles in this process's cache (what it compiles,
    the later tests' own exports find there), each other lane in one of its own."""
    from torch._inductor.runtime.cache_dir_utils import cache_dir

    names, session_cache = list(builds), cache_dir()
    lanes = []
    for lane in range(EXPORT_LANES):
        jobs = [dict(checkpoint=str(checkpoint), out=str(root / name), **builds[name])
                for name in names[lane::EXPORT_LANES]]
        cache = os.path.join(session_cache, f"dbrx-aot-tests-lane-{lane}") if lane else session_cache
        env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": cache}
        lanes.append(subprocess.Popen([sys.executable, "-c", EXPORT_LANE, json.dumps(jobs)], env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    try:
        outputs = [proc.communicate(timeout=1200)[0] for proc in lanes]
    finally:
        for proc in lanes:
            proc.kill()  # a lane still running when another failed (kill passes over one that ended)
    for proc, out in zip(lanes, outputs):
        assert proc.returncode == 0, f"export lane {proc.args[-1]}: exit {proc.returncode}\n{out[-4000:]}"
    return {name: root / name for name in names}


@pytest.fixture(scope="session")
def artifacts(tiny_checkpoint, tmp_path_factory) -> dict[str, Path]:
    """One tiny-preset fp32 artifact per MoE mode, exported once per session (compiles are slow).

    The gather one has batch 1 (one-token decode as generation runs it; its fp32 weights multiply
    through BLAS, the narrower formats' batch-1 artifacts through model.rowdot: weight_artifacts);
    the others have batch 2 (ragged batches).
    """
    return export_side_by_side(tiny_checkpoint, tmp_path_factory.mktemp("artifacts"),
                               {moe: dict(formats=ARTIFACT_FORMATS, moe=moe,
                                          **{**ARTIFACT_SHAPES, "batch_size": 1 if moe == "gather" else 2})
                                for moe in ("dense", "gather", "auto")})


@dataclasses.dataclass
class DryRun:
    proc: subprocess.CompletedProcess
    out: Path   # summary.json, summary.md, log.txt
    work: Path  # its checkpoints and artifacts: slice-NAME are compile-only (--skip-weights) exports


@pytest.fixture(scope="session")
def gpu_check_dry_run(tmp_path_factory) -> DryRun:
    """`make gpu-check DEVICE=cpu` run once (its exports are the suite's slowest minutes): the GPU
    check's own test reads its summary, others reuse its artifacts."""
    gpu_check = load_script("gpu_check")
    root = tmp_path_factory.mktemp("gpu-check")
    out, work = root / "out", root / "work"
    # Never pip-install into the test's environment: the install stage only confirms this tree is installed.
    flags = f"--work {work}" + ("" if gpu_check.installed_from_here() else " --skip-install")
    proc = subprocess.run(["make", "-s", "gpu-check", "DEVICE=cpu", f"PYTHON={sys.executable}", f"OUT={out}",
                           f"GPU_CHECK_FLAGS={flags}"], cwd=Path(__file__).resolve().parent.parent,
                          capture_output=True, text=True, timeout=900)
    return DryRun(proc, out, work)


def copy_artifact(src: Path, dst: Path) -> Path:
    import shutil
    shutil.copytree(src, dst)
    return dst


@pytest.fixture(scope="session")
def half_artifacts(tiny_checkpoint, tmp_path_factory) -> dict[str, Path]:
    """The tiny preset exported in bf16 and in fp16, both formats (the released weights are bf16)."""
    return export_side_by_side(tiny_checkpoint, tmp_path_factory.mktemp("half"),
                               {dtype: dict(formats=ARTIFACT_FORMATS, dtype=dtype, batch_size=1, max_seq_len=64,
                                            prefill_chunk=8)
                                for dtype in ("bfloat16", "float16")})


@pytest.fixture(scope="session")
def weight_artifacts(tiny_checkpoint, tmp_path_factory) -> dict[str, Path]:
    """The tiny preset with its matrices stored as int8 (batch 2, both formats; batch 1, aoti only:
    the row-dot decode form; batch 1, ONNX through MatMulNBits with int8 activations) and as bf16
    computed in fp32 (batch 1, both formats)."""
    # In this order, the two lanes get alike work: int8 (both formats) and int8-acc4 (ONNX), against
    # int8-b1 (aoti) and bfloat16 (both).
    builds = {"int8": dict(weights_format="int8", batch_size=2, formats=ARTIFACT_FORMATS),
              "int8-b1": dict(weights_format="int8", batch_size=1, formats="aoti"),
              "int8-acc4": dict(weights_format="int8", batch_size=1, formats="onnx", onnx_accuracy_level=4),
              "bfloat16": dict(weights_format="bfloat16", batch_size=1, formats=ARTIFACT_FORMATS)}
    return export_side_by_side(tiny_checkpoint, tmp_path_factory.mktemp("weights"),
                               {name: dict(max_seq_len=64, prefill_chunk=8, **options)
                                for name, options in builds.items()})
