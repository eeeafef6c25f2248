"""ONNX artifacts on onnxruntime's CPU provider against eager, and the ways loading one goes wrong."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import dbrx_aot
import test_ladder as ladder
from conftest import TOLERANCE, copy_artifact
from dbrx_aot.errors import DbrxAotError

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

ATOL = TOLERANCE[("onnxruntime", torch.float32)]


def test_checker_and_external_data_into_weights(artifacts):
    art = artifacts["auto"]
    manifest = json.loads((art / "manifest.json").read_text())
    for graph in ("prefill", "decode"):
        path = art / manifest["graphs"][graph]["onnx"]
        assert path.parent == art  # at the root: onnxruntime refuses external data outside it
        onnx.checker.check_model(str(path), full_check=True)
        model = onnx.load(str(path), load_external_data=False)
        assert model.opset_import[0].version >= 18
        locations = set()
        for init in model.graph.initializer:
            entries = {e.key: e.value for e in init.external_data}
            assert init.data_location == onnx.TensorProto.EXTERNAL, init.name
            assert entries["location"].startswith("weights/model-"), entries
            locations.add(entries["location"])
        assert {f"weights/{f}" for f in manifest["weights"].values()} == locations
        assert path.stat().st_size < 2_000_000  # the graph only: no weights inside


def test_gather_decode_selects_experts_with_gather_not_gathernd(artifacts):
    """The chosen experts' weights come out of [E, F, D] by Gather along E (model.MoE's index_select):
    onnxruntime's CPU GatherND copies them at half the speed (small preset decode: 12 of them were
    8 of 31 ms a step)."""
    art = artifacts["gather"]
    model = onnx.load(str(art / "decode.onnx"), load_external_data=False)
    experts = {f"{p}.ffn.{w}" for p in ("blocks.0", "blocks.1") for w in ("w1", "v1", "w2")}
    readers = [n for n in model.graph.node if any(i.endswith(tuple(experts)) for i in n.input)]
    assert readers and {n.op_type for n in readers} == {"Gather"}, [(n.op_type, list(n.input)) for n in readers]
    assert all(a.i == 0 for n in readers for a in n.attribute if a.name == "axis")


def test_the_artifact_holds_one_copy_of_the_weights(artifacts):
    """AOTI packages and both ONNX graphs together: the artifact is about the weights' size."""
    art = artifacts["auto"]
    manifest = json.loads((art / "manifest.json").read_text())
    weights = sum(f["bytes"] for rel, f in manifest["files"].items() if rel.startswith("weights/"))
    total = sum(f["bytes"] for f in manifest["files"].values())
    params = dbrx_aot.load_runtime(art, "eager", progress=False).config.param_count()
    assert weights == pytest.approx(params * 4, rel=0.001)  # fp32, once
    assert total < 1.25 * weights


def test_bf16_refused_on_cpu_provider(artifacts, tmp_path):
    art = copy_artifact(artifacts["auto"], tmp_path / "a")
    manifest = json.loads((art / "manifest.json").read_text())
    manifest["dtype"] = "bfloat16"
    (art / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(DbrxAotError, match="bfloat16 cannot run on onnxruntime's CPU execution provider"):
        dbrx_aot.load_runtime(art, "onnxruntime", progress=False)


def test_unknown_provider(artifacts):
    with pytest.raises(DbrxAotError, match="has no NoSuchExecutionProvider"):
        dbrx_aot.load_runtime(artifacts["auto"], "onnxruntime", providers=["NoSuchExecutionProvider"], progress=False)


def test_graph_not_matching_manifest(artifacts, tmp_path):
    art = copy_artifact(artifacts["auto"], tmp_path / "a")
    manifest = json.loads((art / "manifest.json").read_text())
    manifest["graphs"]["decode"]["inputs"][0]["shape"] = [3, 1]
    (art / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(DbrxAotError, match="decode.onnx: graph inputs .* do not match"):
        dbrx_aot.load_runtime(art, "onnxruntime", progress=False, verify_checksums=False)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU error")
def test_cuda_asked_without_gpu(artifacts):
    with pytest.raises(DbrxAotError, match="CUDA is not available"):
        dbrx_aot.load_runtime(artifacts["auto"], "onnxruntime", device="cuda", progress=False)


def test_binding_passes_pointers_shapes_and_types():
    """The I/O binding logic, which the CUDA provider path shares, recorded on a fake binding."""
    from dbrx_aot.runtimes.onnxruntime import bind

    class Recorder:
        def __init__(self):
            self.calls = []

        def bind_input(self, *args):
            self.calls.append(("in", *args))

        def bind_output(self, *args):
            self.calls.append(("out", *args))

    io = Recorder()
    x = torch.zeros(2, 3, dtype=torch.bfloat16)
    y = torch.zeros(4, dtype=torch.int64)
    bind(io, "k_cache", x)
    bind(io, "logits", y, output=True)
    assert io.calls == [("in", "k_cache", "cpu", 0, 16, [2, 3], x.data_ptr()),
                        ("out", "logits", "cpu", 0, 7, [4], y.data_ptr())]


def test_gpu_provider_path(artifacts):
    """With a GPU and onnxruntime-gpu's CUDA provider, the same ladder on the device."""
    if not torch.cuda.is_available() or "CUDAExecutionProvider" not in ort.get_available_providers():
        pytest.skip("needs a CUDA GPU and onnxruntime's CUDA execution provider")
    rt = dbrx_aot.load_runtime(artifacts["auto"], "onnxruntime", device="cuda", progress=False)
    eager = dbrx_aot.load_runtime(artifacts["auto"], "eager", device="cuda", progress=False)
    ladder.check_prefill_and_decode(rt, eager, atol=ATOL)


def test_export_onnx_only_format(tiny_checkpoint, tmp_path):
    from dbrx_aot.export import export_artifact

    report = export_artifact(tiny_checkpoint, tmp_path / "o", formats="onnx", max_seq_len=16, prefill_chunk=4,
                             progress=False)
    assert not (report.path / "aoti").exists()
    rt = dbrx_aot.load_runtime(report.path, "onnxruntime", progress=False)
    eager = dbrx_aot.load_runtime(report.path, "eager", progress=False)
    ids = torch.tensor([ladder.prompt(10, seed=3)])
    torch.testing.assert_close(rt.logits(ids), eager.logits(ids), atol=ATOL, rtol=0)
    with pytest.raises(DbrxAotError, match="holds onnx, not aoti"):
        dbrx_aot.load_runtime(report.path, "aoti", progress=False)
    assert Path(report.path / "prefill.onnx").is_file()
