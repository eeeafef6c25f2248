"""The Triton gather kernels (dbrx_aot/moe_kernels.py) against the PyTorch gather form.

The kernels run on CUDA; without a GPU, Triton's interpreter runs the very same kernel code on CPU
tensors, but only when TRITON_INTERPRET=1 was set before triton was imported. So the checks below
run where that holds (``test_kernels_in_the_triton_interpreter`` starts this file again in a process
of its own with it set), and on CUDA where there is one (marked gpu: the GPU check runs them;
tests/test_gpu.py compiles them into packages).
"""

from __future__ import annotations

import copy
import inspect
import os
import re
import subprocess
import sys

import pytest
import torch

import dbrx_aot
from dbrx_aot.model import Int8MoE, MoE, use_triton_gather

triton = pytest.importorskip("triton", reason="the Triton kernels need triton (tests: pip install triton)")
from dbrx_aot import moe_kernels  # noqa: E402  (after the skip: it imports triton)

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
kernels_run_here = pytest.mark.skipif(not (INTERPRETED or DEVICE == "cuda"),
                                      reason="no CUDA device (test_kernels_in_the_triton_interpreter runs them)")


@pytest.mark.skipif(INTERPRETED or DEVICE == "cuda", reason="this is that process, or the kernels run on CUDA here")
def test_kernels_in_the_triton_interpreter():
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__],
                         capture_output=True, text=True, env=env, timeout=600)
    assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-3000:]
    summary = run.stdout.strip().splitlines()[-1]
    # Skipped there: this test, and the Hopper compile (the main process's).
    assert re.fullmatch(r"\d+ passed, 2 skipped in .*", summary), summary


def stored(E: int, R: int, C: int, form: str, generator: torch.Generator) -> tuple[torch.Tensor, int]:
    """Expert weights [E, R, C] as stored in ``form``, and their zero point."""
    if form == "int8":
        return torch.randint(0, 256, (E, R, C), dtype=torch.uint8, generator=generator), 128
    return torch.randn(E, R, C, generator=generator).to(getattr(torch, form)), 0


# Shapes that mask both ways and loop: R and C not multiples of any block, C over several column
# steps, R over several splits of the w2 reduction (coldot_split), one token and several.
SHAPES = [(5, 150, 600, 3, 2), (16, 200, 72, 1, 4)]


@pytest.mark.gpu
@kernels_run_here
@pytest.mark.parametrize("form", ["float32", "bfloat16", "int8"])
@pytest.mark.parametrize("E, R, C, N, k", SHAPES)
def test_rowdot_and_coldot_equal_the_gathered_products(form, E, R, C, N, k):
    g = torch.Generator().manual_seed(E * R + C)
    w, zero = stored(E, R, C, form, g)
    x = torch.randn(N, C, generator=g).to(torch.bfloat16 if form == "bfloat16" else torch.float32)
    idx = torch.randint(0, E, (N, k), generator=g)
    a = torch.randn(N, k, R, generator=g)
    chosen = (w.double() - zero)[idx]                                   # [N, k, R, C]
    want_rows = torch.einsum("nc,nkrc->nkr", x.double(), chosen)
    want_cols = torch.einsum("nkr,nkrc->nkc", a.double(), chosen)
    to = dict(device=DEVICE)
    rows = moe_kernels.gather_rowdot(x.to(**to), idx.to(**to), w.to(**to), zero).cpu()
    cols = moe_kernels.gather_coldot(a.to(**to), idx.to(**to), w.to(**to), zero).cpu()
    assert rows.dtype == cols.dtype == torch.float32
    assert rows.shape == (N, k, R) and cols.shape == (N, k, C)
    # fp32 sums of C (R) products: a few ulps of the sum of magnitudes
    for got, want, n in ((rows, want_rows, C), (cols, want_cols, R)):
        bound = 4 * n * torch.finfo(torch.float32).eps * want.abs().max().item() + 1e-6
        assert (got.double() - want).abs().max().item() <= bound


def test_coldot_split_covers_every_row_once():
    for slots, R, C in [(4, 10752, 6144), (12, 10752, 6144), (1, 48, 64), (6, 150, 600), (4, 64 * 7 + 1, 256)]:
        splits, rows = moe_kernels.coldot_split(slots, R, C)
        assert rows % moe_kernels.ROWS_PER_SPLIT_STEP == 0
        assert (splits - 1) * rows < R <= splits * rows                 # no empty split, none left over
        for block_r, _, _ in moe_kernels.COLDOT_CONFIGS:
            assert rows % block_r == 0                                  # a block never crosses into the next split
    splits, _ = moe_kernels.coldot_split(4, 10752, 6144)                # DBRX decode at batch 1
    assert 512 <= 4 * (6144 // 256) * splits <= 2048                    # about COLDOT_PROGRAMS programs


def moe_pair(form: str) -> tuple[MoE, MoE]:
    """A parity-config MoE with random weights in ``form``, and its copy on the Triton kernels."""
    from conftest import parity_config

    torch.manual_seed(0)
    moe = MoE(parity_config("base"))
    for p in moe.parameters():
        p.data.normal_(0, 0.3)
    moe = Int8MoE(moe) if form == "int8" else moe.to(getattr(torch, form))
    moe = moe.to(DEVICE)
    return moe, use_triton_gather(copy.deepcopy(moe))


@pytest.mark.gpu
@kernels_run_here
@pytest.mark.parametrize("form", ["float32", "bfloat16", "int8"])
def test_moe_gather_form_on_the_kernels_equals_its_pytorch_form(form):
    moe, kernels = moe_pair(form)
    assert kernels.gather_kernel == "triton" and moe.gather_kernel == "inductor"
    dt = torch.bfloat16 if form == "bfloat16" else torch.float32
    x = torch.randn(3, 1, moe.config.d_model, generator=torch.Generator().manual_seed(1)).to(DEVICE, dt)
    with torch.no_grad():
        want, got = moe(x, "gather"), kernels(x, "gather")
        if form == "bfloat16":
            # Both round to bf16 at the same points; the sums differ in order (and eager PyTorch
            # rounds each product to bf16): held to the bf16 form's own error against fp32.
            exact = copy.deepcopy(moe).float()(x.float(), "gather")
            bar = 2 * (want.float() - exact).abs().max() + 1e-3
            assert (got.float() - exact).abs().max() <= bar
        else:
            torch.testing.assert_close(got, want, atol=1e-5 * want.abs().max().item(), rtol=1e-5)
        # Forms without a gather are untouched.
        assert torch.equal(kernels(x, "dense"), moe(x, "dense"))


def test_use_triton_gather_says_when_triton_is_missing(monkeypatch):
    monkeypatch.setattr(moe_kernels, "available", lambda: False)
    with pytest.raises(dbrx_aot.DbrxAotError, match="--moe-kernel triton: triton is not installed"):
        use_triton_gather(MoE(dbrx_aot.config.preset("tiny")))


# What the H100 and H200 are: compute capability 9.0.
HOPPER = 90


@pytest.mark.skipif(INTERPRETED, reason="compiled in the main test process (the interpreter compiles nothing)")
def test_kernels_compile_for_hopper_without_spilling_registers(tmp_path):
    """Every autotuned configuration of both kernels, as a GPU machine's compile would build it for
    bf16 weights at DBRX's decode (k = 4), its tensors 16-byte aligned (Triton specialises a launch on
    that): Triton's own compiler and ptxas (in its wheel) make the sm_90 binary without a GPU;
    cuobjdump says how many registers each thread uses and that none spill to local memory; and the
    PTX reads every weight byte in 16-byte loads (without the alignment, the same kernels read 2 bytes
    a load). A kernel that only the interpreter accepts fails here, on CPU."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    if not os.path.exists(cuobjdump):
        pytest.skip(f"this triton {triton.__version__} has no cuobjdump at {cuobjdump}")
    pointers = {"idx_ptr": "*i64", "w_ptr": "*bf16"}
    shape = {"R": 10752, "C": 6144, "ZERO": 0}  # DBRX's expert [F, D], bf16
    _, rows_per_split = moe_kernels.coldot_split(4, shape["R"], shape["C"])
    kernels = [(moe_kernels._rowdot, moe_kernels.ROWDOT_CONFIGS, {**shape, "K": 4},
                {"x_ptr": "*bf16", **pointers, "out_ptr": "*fp32"}),
               (moe_kernels._coldot, moe_kernels.COLDOT_CONFIGS, {**shape, "K": 4, "ROWS_PER_SPLIT": rows_per_split},
                {"a_ptr": "*bf16", **pointers, "part_ptr": "*fp32", "SLOTS": "i32"})]
    for fn, table, constants, args in kernels:
        params = list(inspect.signature(fn).parameters)
        for r, c, warps in table:
            constexprs = {**constants, "BLOCK_R": r, "BLOCK_C": c}
            signature = {name: "constexpr" if name in constexprs else args[name] for name in params}
            aligned = {(i,): [["tt.divisibility", 16]] for i, name in enumerate(params) if name.endswith("_ptr")}
            source = ASTSource(fn=triton.jit(fn), signature=signature, constexprs=constexprs, attrs=aligned)
            compiled = triton.compile(source, target=GPUTarget("cuda", HOPPER, 32), options={"num_warps": warps})
            # The weight tile's bytes per thread per step, all in 16-byte vector loads (ld.global.v4.b32).
            wide = len(re.findall(r"\bld\.global(?:\.\w+)*\.v4\.b32\b", compiled.asm["ptx"]))
            assert wide * 16 >= r * c * 2 // (32 * warps), (fn.__name__, r, c, warps, wide)
            cubin = tmp_path / f"{fn.__name__}-{r}-{c}-{warps}.cubin"
            cubin.write_bytes(compiled.asm["cubin"])
            usage = subprocess.run([cuobjdump, "-res-usage", str(cubin)], capture_output=True, text=True,
                                   check=True).stdout
            registers, local = (int(re.search(rf"\b{key}:(\d+)", usage).group(1)) for key in ("REG", "LOCAL"))
            assert local == 0 and registers <= 255, (fn.__name__, r, c, warps, usage)
