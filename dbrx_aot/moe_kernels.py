"""Triton kernels for the gather form of the MoE (decode): the chosen experts' rows streamed once.

The gather form written in PyTorch (model.MoE, ``gather_kernel = "inductor"``) is what Inductor
compiles on every device. On CUDA at batch 1 its kernels read the expert rows at about a third of
the copy bandwidth (third H200 run: 45% of it for the whole real-width step), where a matrix-vector
product can stream at nearly all of it. These two kernels are that product over the rows of the
experts each token chose, fp32 accumulation, no atomics (the same sums in the same order on every
call, so CUDA graphs on and off agree bit for bit):

- ``gather_rowdot(x, idx, w)``: ``out[n, j, r] = sum_c x[n, c] * w[idx[n, j], r, c]`` (w1, v1: the
  reduction runs along each row, contiguous);
- ``gather_coldot(a, idx, w)``: ``out[n, j, c] = sum_r a[n, j, r] * w[idx[n, j], r, c]`` (w2: the
  reduction runs down the rows; split into row ranges summed afterwards, so that enough programs
  stream at batch 1).

Weights are read in their stored dtype and widened to fp32 in the kernel; ``zero_point`` is what
the stored integers are offset by (128 for the uint8 ``q + 128`` int8 form, 0 for floats), the
scales being applied after the reduction by the module, as in its PyTorch form. Both are
``torch.library.triton_op`` operators, so torch.export keeps them and AOTInductor compiles them
into the package (autotuned there on CUDA). On CPU tensors they run in Triton's interpreter: the
test suite's check of the very kernels a GPU compiles (slow; tiny sizes only).

Letters as in model.py: N tokens, k chosen experts per token (slots N*k), E experts, R rows
(F for w1/v1/w2), C columns (D).
"""

from __future__ import annotations

import os

import torch

try:
    import triton
    import triton.language as tl
    from torch.library import triton_op, wrap_triton
except ImportError:  # the gather form then stays PyTorch (model.MoE.gather_kernel); checked by available()
    triton = None

# Triton's interpreter (TRITON_INTERPRET=1 before triton is imported): the kernels run on CPU tensors,
# as numpy, for the test suite. Otherwise they run on CUDA only.
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"


def available() -> bool:
    return triton is not None


# Rows per program and columns per step: the configurations Triton's autotuner times on the GPU
# at compile time (the interpreter takes the first).
ROWDOT_CONFIGS = ((8, 256, 4), (4, 512, 4), (16, 256, 8), (8, 512, 8), (2, 1024, 4), (32, 128, 4))
COLDOT_CONFIGS = ((16, 256, 4), (32, 128, 4), (8, 512, 4), (16, 512, 8), (64, 64, 4), (32, 256, 8))
ROWS_PER_SPLIT_STEP = 64     # every coldot BLOCK_R divides it
COLDOT_PROGRAMS = 1024       # about 8 per streaming multiprocessor on an H100/H200 (132)


def coldot_split(slots: int, R: int, C: int) -> tuple[int, int]:
    """(splits, rows per split) of the w2 reduction: enough programs to stream at batch 1 (slots
    x column blocks x splits of about COLDOT_PROGRAMS), each range a whole number of steps."""
    column_blocks = -(-C // 256)
    splits = max(1, min(-(-R // ROWS_PER_SPLIT_STEP), -(-COLDOT_PROGRAMS // (slots * column_blocks))))
    rows = -(-R // splits)
    rows = -(-rows // ROWS_PER_SPLIT_STEP) * ROWS_PER_SPLIT_STEP
    return -(-R // rows), rows


if triton is not None:
    # The shapes are compile-time constants (one model, one compile per shape): fixed trip counts for
    # the compiler, and loop bounds that Triton's interpreter takes as Python ints (triton 3.6's cannot
    # turn a runtime scalar into one under numpy 2.4).
    # One grid axis (no 65535 limit on slots), the slot its slowest part. AOTInductor autotunes on
    # generated inputs, whose idx is all zeros: every slot reads expert 0. Programs of the k slots of a
    # token that run at the same time would then read the same rows, from L2, and the tuner would time
    # a quarter of a real step's DRAM reads. So slot j of a token walks its rows from j/k of the way
    # in: rowdot hands its row blocks round by that much (each output row is still one program's
    # whole sum: the same result), coldot starts its loop down the rows there (a fixed order per slot).
    def _rowdot(x_ptr, idx_ptr, w_ptr, out_ptr, R: tl.constexpr, C: tl.constexpr, K: tl.constexpr,
                ZERO: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
        BLOCKS: tl.constexpr = (R + BLOCK_R - 1) // BLOCK_R
        pid = tl.program_id(0)
        slot = pid // BLOCKS                                            # n * K + j
        n = slot // K
        e = tl.load(idx_ptr + slot).to(tl.int64)
        block = (pid % BLOCKS + (slot % K) * (BLOCKS // K)) % BLOCKS
        rows = block * BLOCK_R + tl.arange(0, BLOCK_R)
        row_ok = rows < R
        w_rows = w_ptr + e * R * C + rows.to(tl.int64)[:, None] * C     # [BLOCK_R, 1]
        acc = tl.zeros([BLOCK_R, BLOCK_C], dtype=tl.float32)
        for c0 in range(0, C, BLOCK_C):
            cols = c0 + tl.arange(0, BLOCK_C)
            col_ok = cols < C
            xv = tl.load(x_ptr + n * C + cols, mask=col_ok, other=0.0).to(tl.float32)
            wv = tl.load(w_rows + cols[None, :], mask=row_ok[:, None] & col_ok[None, :], other=0)
            acc += (wv.to(tl.float32) - ZERO) * xv[None, :]             # x is 0 where masked
        tl.store(out_ptr + slot * R + rows, tl.sum(acc, axis=1), mask=row_ok)

    def _coldot(a_ptr, idx_ptr, w_ptr, part_ptr, SLOTS, R: tl.constexpr, C: tl.constexpr, K: tl.constexpr,
                ROWS_PER_SPLIT: tl.constexpr, ZERO: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
        COLUMN_BLOCKS: tl.constexpr = (C + BLOCK_C - 1) // BLOCK_C
        SPLITS: tl.constexpr = (R + ROWS_PER_SPLIT - 1) // ROWS_PER_SPLIT
        STEPS: tl.constexpr = ROWS_PER_SPLIT // BLOCK_R                 # BLOCK_R divides it
        pid = tl.program_id(0)
        slot = pid // (COLUMN_BLOCKS * SPLITS)
        split = pid // COLUMN_BLOCKS % SPLITS
        e = tl.load(idx_ptr + slot).to(tl.int64)
        cols = pid % COLUMN_BLOCKS * BLOCK_C + tl.arange(0, BLOCK_C)
        col_ok = cols < C
        first = (slot % K) * (STEPS // K)
        acc = tl.zeros([BLOCK_R, BLOCK_C], dtype=tl.float32)
        for step in range(0, STEPS):
            r0 = (step + first) % STEPS * BLOCK_R
            rows = split * ROWS_PER_SPLIT + r0 + tl.arange(0, BLOCK_R)
            row_ok = rows < R
            av = tl.load(a_ptr + slot * R + rows, mask=row_ok, other=0.0).to(tl.float32)
            wv = tl.load(w_ptr + e * R * C + rows.to(tl.int64)[:, None] * C + cols[None, :],
                         mask=row_ok[:, None] & col_ok[None, :], other=0)
            acc += (wv.to(tl.float32) - ZERO) * av[:, None]             # a is 0 where masked
        tl.store(part_ptr + (split * SLOTS + slot) * C + cols, tl.sum(acc, axis=0), mask=col_ok)

    def _configs(table):
        return [triton.Config({"BLOCK_R": r, "BLOCK_C": c}, num_warps=w) for r, c, w in table]

    if INTERPRETED:  # no timing to tune by: the first configuration
        _rowdot_kernel, _coldot_kernel = triton.jit(_rowdot), triton.jit(_coldot)
    else:
        _rowdot_kernel = triton.autotune(_configs(ROWDOT_CONFIGS), key=["R", "C"])(triton.jit(_rowdot))
        _coldot_kernel = triton.autotune(_configs(COLDOT_CONFIGS), key=["R", "C", "SLOTS"])(triton.jit(_coldot))

    def _launchable(kernel):
        """The kernel as a triton_op launches it: wrapped, so that torch.export and Inductor see it. The
        interpreter's kernels only ever run eagerly, and are launched as they are (what torch 2.13's
        wrap_triton does with them; torch 2.11's refuses them)."""
        return kernel if INTERPRETED else wrap_triton(kernel)

    def _fixed(table) -> dict:
        """The block sizes passed at launch: none where the autotuner picks them."""
        return {"BLOCK_R": table[0][0], "BLOCK_C": table[0][1]} if INTERPRETED else {}

    def _check(x: torch.Tensor, idx: torch.Tensor, w: torch.Tensor, zero_point: int) -> None:
        assert w.dim() == 3 and idx.dim() == 2 and idx.dtype == torch.int64, (w.shape, idx.shape, idx.dtype)
        assert x.device == idx.device == w.device, (x.device, idx.device, w.device)
        assert x.is_cuda or INTERPRETED, "the Triton gather kernels run on CUDA (on CPU: TRITON_INTERPRET=1)"
        assert zero_point == 0 or w.dtype == torch.uint8, (zero_point, w.dtype)

    @triton_op("dbrx_aot::gather_rowdot", mutates_args=())
    def gather_rowdot(x: torch.Tensor, idx: torch.Tensor, w: torch.Tensor, zero_point: int) -> torch.Tensor:
        """x [N, C], idx [N, k], w [E, R, C] -> [N, k, R] fp32: each slot's expert rows times its token."""
        _check(x, idx, w, zero_point)
        (N, k), (_, R, C) = idx.shape, w.shape
        x, idx, w = x.contiguous(), idx.contiguous(), w.contiguous()
        out = torch.empty(N, k, R, dtype=torch.float32, device=x.device)
        _launchable(_rowdot_kernel)[lambda meta: (triton.cdiv(R, meta["BLOCK_R"]) * N * k,)](
            x, idx, w, out, R=R, C=C, K=k, ZERO=zero_point, **_fixed(ROWDOT_CONFIGS))
        return out

    @triton_op("dbrx_aot::gather_coldot", mutates_args=())
    def gather_coldot(a: torch.Tensor, idx: torch.Tensor, w: torch.Tensor, zero_point: int) -> torch.Tensor:
        """a [N, k, R], idx [N, k], w [E, R, C] -> [N, k, C] fp32: each slot's row weights down its
        expert's rows, in row ranges (coldot_split) summed after the kernel."""
        _check(a, idx, w, zero_point)
        (N, k), (_, R, C) = idx.shape, w.shape
        a, idx, w = a.contiguous(), idx.contiguous(), w.contiguous()
        splits, rows = coldot_split(N * k, R, C)
        part = torch.empty(splits, N, k, C, dtype=torch.float32, device=a.device)
        _launchable(_coldot_kernel)[lambda meta: (triton.cdiv(C, meta["BLOCK_C"]) * splits * N * k,)](
            a, idx, w, part, N * k, R=R, C=C, K=k, ROWS_PER_SPLIT=rows, ZERO=zero_point, **_fixed(COLDOT_CONFIGS))
        return part.sum(0)
