"""ONNX export: the same nn.Module through torch.onnx (dynamo), its weights pointing into weights/.

ONNX has no in-place state (a mutated input is dropped from the graph), so the exported graph is
``FunctionalStep``: it reads the cache and returns the call's new keys and values; the runtime
writes them into its cache. ``optimize=False`` keeps every initializer under its parameter's name
with its parameter's bytes (the optimizer would fold transposes into new copies of the weights),
and each initializer then becomes a reference (location, offset, length) into the artifact's
safetensors files: the weights are stored once, whatever formats the artifact carries. The
graphs sit at the artifact's root because onnxruntime refuses external data outside the model's
own directory.
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import torch

from dbrx_aot.errors import DbrxAotError
from dbrx_aot.manifest import WEIGHTS_DIR
from dbrx_aot.export.trace import GraphSpec, example_inputs
from dbrx_aot.model import STEP_PREFIX, DbrxModel, FunctionalStep
from dbrx_aot.safetensors_io import byte_ranges

INPUT_NAMES = ["tokens", "positions", "k_cache", "v_cache"]
OUTPUT_NAMES = ["logits", "new_k", "new_v"]
OPSET = 18


def export_onnx(model: DbrxModel, spec: GraphSpec, batch_size: int, max_seq_len: int, root: Path,
                weights: dict[str, str]) -> str:
    """Write ``root/{spec.name}.onnx``; returns its path relative to ``root``."""
    import onnx
    import onnx_ir as ir

    if not weights:
        raise DbrxAotError("--skip-weights works with --format aoti only: ONNX graphs point into weights/")
    param = model.wte.weight  # the compute dtype (matrices may be stored in another)
    args = example_inputs(model.config, spec, batch_size, max_seq_len, param.dtype, param.device)
    with warnings.catch_warnings(), _quiet_exporter():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(FunctionalStep(model, spec.moe), args, dynamo=True, optimize=False,
                                    opset_version=OPSET, input_names=INPUT_NAMES, output_names=OUTPUT_NAMES,
                                    verbose=False)
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
