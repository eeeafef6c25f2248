"""ONNX export: the same nn.Module through torch.onnx (dynamo), its weights pointing into weights/.

ONNX has no in-place state (a mutated input is dropped from the graph), so the exported graph is
``FunctionalStep``: it reads the cache and returns the call's new keys and values; the runtime
writes them into its cache. ``optimize=False`` keeps every initializer under its parameter's name
with its parameter's bytes (the optimizer would fold transposes into new copies of the weights),
and each initializer then becomes a reference (location, offset, length) into the artifact's
safetensors files: the weights are stored once, whatever formats the artifact carries. The
graphs sit at the artifact's root because onnxruntime refuses external data outside the model's
own directory.

The ONNX export runs the model in the forms onnxruntime's kernels favour (``onnx_forms``; the same
math and the same parameters, each form tested against the module it replaces): the gathered
experts as batched matmuls; int8 experts dequantised by one ``DequantizeLinear`` (onnxruntime runs
a cast and a subtraction as two slow passes, and folds them into fp32 copies of whole matrices at
load; it leaves DequantizeLinear alone); with ``accuracy_level=4`` the linear layers (Wqkv,
out_proj, lm_head) as ``com.microsoft::MatMulNBits`` with bits=8, which reads the very same uint8
``q + 128`` bytes and quantises the activations to int8 per block. Without it the int8 linear
layers are dequantised exactly (onnxruntime folds them into fp32 constants when it loads them).
AOTInductor never sees these custom ops.
"""

from __future__ import annotations

import copy
import logging
import warnings
from pathlib import Path

import torch

from dbrx_aot.errors import DbrxAotError
from dbrx_aot.manifest import WEIGHTS_DIR
from dbrx_aot.export.trace import GraphSpec, example_inputs
from dbrx_aot.model import STEP_PREFIX, DbrxModel, FunctionalStep, Int8Linear, Int8MoE, MoE
from dbrx_aot.quantize import INT8_ZERO_POINT
from dbrx_aot.safetensors_io import byte_ranges

INPUT_NAMES = ["tokens", "positions", "k_cache", "v_cache"]
OUTPUT_NAMES = ["logits", "new_k", "new_v"]
OPSET = 18


ONNX_ACCURACY_LEVELS = (4,)  # int8 activations; level 0 (exact) ran 217 ms for the small lm_head, level 4 3-5 ms


def export_onnx(model: DbrxModel, spec: GraphSpec, batch_size: int, max_seq_len: int, root: Path,
                weights: dict[str, str], accuracy_level: int | None = None) -> str:
    """Write ``root/{spec.name}.onnx``; returns its path relative to ``root``."""
    import onnx
    import onnx_ir as ir

    if not weights:
        raise DbrxAotError("--skip-weights works with --format aoti only: ONNX graphs point into weights/")
    param = model.wte.weight  # the compute dtype (matrices may be stored in another)
    args = example_inputs(model.config, spec, batch_size, max_seq_len, param.dtype, param.device)
    # A structural copy sharing the same parameters (no weight is copied).
    model = onnx_forms(copy.deepcopy(model, memo={id(p): p for p in model.parameters()}), accuracy_level)
    table = {torch.ops.dbrx_aot.int8_linear.default: int8_linear_onnx,
             torch.ops.dbrx_aot.dequantize_uint8.default: dequantize_uint8_onnx}
    with warnings.catch_warnings(), _quiet_exporter():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(FunctionalStep(model, spec.moe), args, dynamo=True, optimize=False,
                                    opset_version=OPSET,
                                    input_names=INPUT_NAMES + ["logit_index"] * spec.selects_logits,
                                    output_names=OUTPUT_NAMES,
                                    custom_translation_table=table, verbose=False)
    ranges = {}
    for file in sorted(set(weights.values())):
        for name, (offset, length) in byte_ranges(root / WEIGHTS_DIR / file).items():
            ranges[name] = (f"{WEIGHTS_DIR}/{file}", offset, length)
    graph = program.model.graph
    for name, value in graph.initializers.items():
        key = name.removeprefix(STEP_PREFIX)
        if key not in ranges:
            raise DbrxAotError(f"ONNX export: initializer {name} is not a weight in {WEIGHTS_DIR}/ (the exporter "
                               "created a constant the artifact does not store)")
        location, offset, length = ranges[key]
        tensor = value.const_value
        expected = tensor.dtype.itemsize * _numel(tensor.shape)
        assert length == expected, (name, length, expected)
        value.const_value = ir.ExternalTensor(location, offset, length, tensor.dtype, shape=tensor.shape,
                                              name=name, base_dir=str(root))
    out = root / f"{spec.name}.onnx"
    ir.save(program.model, str(out))
    onnx.checker.check_model(str(out), full_check=True)
    return out.name


@torch.library.custom_op("dbrx_aot::int8_linear", mutates_args=())
def int8_linear(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, accuracy_level: int) -> torch.Tensor:
    """``Int8Linear``'s math as one op, so the ONNX export can map it to MatMulNBits."""
    return torch.nn.functional.linear(x, weight.to(x.dtype) - INT8_ZERO_POINT) * scale.to(x.dtype)


@int8_linear.register_fake
def _int8_linear_shape(x, weight, scale, accuracy_level):
    return x.new_empty(*x.shape[:-1], weight.shape[0])


class MatMulNBitsLinear(Int8Linear):
    """An Int8Linear (same parameters, same names) that exports as MatMulNBits."""

    accuracy_level = 4

    def forward(self, x):
        return torch.ops.dbrx_aot.int8_linear(x, self.weight, self.scale, self.accuracy_level)


@torch.library.custom_op("dbrx_aot::dequantize_uint8", mutates_args=())
def dequantize_uint8(u: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``Int8MoE.weight``'s math as one op (u - 128 in ``dtype``), exported as one DequantizeLinear."""
    return u.to(dtype) - INT8_ZERO_POINT


@dequantize_uint8.register_fake
def _dequantize_uint8_shape(u, dtype):
    return u.new_empty(u.shape, dtype=dtype)


class DequantizeLinearMoE(Int8MoE):
    """An Int8MoE (same parameters) whose expert weights are dequantised by one op."""

    def weight(self, w: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        return torch.ops.dbrx_aot.dequantize_uint8(w, dtype)


def onnx_forms(module: torch.nn.Module, accuracy_level: int | None) -> torch.nn.Module:
    """The forms of the model the ONNX export traces, in place: batched matmuls for gathered experts,
    DequantizeLinear for int8 experts, and (with ``accuracy_level``) MatMulNBits for int8 linear layers."""
    for child in module.modules():
        if isinstance(child, MoE):
            child.gather_matmul = True
        if type(child) is Int8MoE:
            child.__class__ = DequantizeLinearMoE
        if type(child) is Int8Linear and accuracy_level is not None:
            matmul_block_size(child.weight.shape[1])  # refuse a width MatMulNBits cannot block
            child.__class__ = MatMulNBitsLinear
            child.accuracy_level = accuracy_level
    return module


def matmul_block_size(K: int) -> int:
    """MatMulNBits' block along K: the largest of 256, 128, 64, 32, 16 dividing K (the CPU kernel
    takes no other); the per-channel scale is repeated over the K / block blocks."""
    for block in (256, 128, 64, 32, 16):
        if K % block == 0:
            return block
    raise DbrxAotError(f"--onnx-accuracy-level: d_model {K} is not a multiple of 16 (MatMulNBits blocks)")


def _matmulnbits_op():
    from onnx.defs import OpSchema
    from onnxscript.values import Op, Opset

    # The contrib op's schema (onnx does not register com.microsoft's): what onnxscript needs to emit it.
    param = OpSchema.FormalParameter
    schema = OpSchema(
        "MatMulNBits", "com.microsoft", 1,
        inputs=[param("A", "T1"), param("B", "T2"), param("scales", "T1")], outputs=[param("Y", "T1")],
        type_constraints=[("T1", ["tensor(float)", "tensor(float16)"], ""), ("T2", ["tensor(uint8)"], "")],
        attributes=[OpSchema.Attribute(name, OpSchema.AttrType.INT, "")
                    for name in ("K", "N", "bits", "block_size", "accuracy_level")])
    return Op(Opset("com.microsoft", 1), "MatMulNBits", schema)


def int8_linear_onnx(x, weight, scale, accuracy_level: int):
    """MatMulNBits(x, B [N, K/bs, bs] = the stored [N, K] uint8 bytes, scales [N * K/bs])."""
    from onnxscript import opset18 as op

    N, K = weight.shape
    bs = matmul_block_size(K)
    b = op.Reshape(weight, op.Constant(value_ints=[N, K // bs, bs]))
    scales = op.Reshape(op.Expand(op.Unsqueeze(scale, op.Constant(value_ints=[1])),
                                  op.Constant(value_ints=[N, K // bs])), op.Constant(value_ints=[N * (K // bs)]))
    return _matmulnbits_op()(x, b, scales, K=K, N=N, bits=8, block_size=bs, accuracy_level=accuracy_level)


def dequantize_uint8_onnx(u, dtype: int):
    """DequantizeLinear(u, scale 1, zero point 128): u - 128 exactly, in one pass (float32 out)."""
    from onnxscript import opset18 as op

    out = op.DequantizeLinear(u, op.Constant(value_float=1.0), op.Cast(op.Constant(value_int=INT8_ZERO_POINT), to=2))
    return out if dtype == 1 else op.Cast(out, to=dtype)


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n


class _quiet_exporter:
    """torch.onnx prints its progress and warns about torchvision; keep the export log readable."""

    def __enter__(self):
        self.loggers = [logging.getLogger(n) for n in ("torch.onnx", "torch.onnx._internal.exporter._registration")]
        self.levels = [lg.level for lg in self.loggers]
        for lg in self.loggers:
            lg.setLevel(logging.ERROR)

    def __exit__(self, *exc):
        for lg, level in zip(self.loggers, self.levels):
            lg.setLevel(level)
