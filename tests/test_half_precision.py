"""Half-precision artifacts: both formats export, and verify holds them to a sound bar.

A bf16 artifact and a bf16 eager model differ by rounding in a different order; neither is the
truth. verify measures each runtime against fp32 eager on the artifact's own weights, with bf16
eager as the baseline (dbrx_aot.verify.Tolerance).
"""

from __future__ import annotations

import onnx
import pytest
import torch

from dbrx_aot.model import ATEN_GROUPED_MM_SHIM
from dbrx_aot.verify import TOLERANCES, Tolerance, verify


def test_bf16_onnx_exports_and_passes_the_checker(half_artifacts):
    for graph in ("prefill", "decode"):
        path = half_artifacts["bfloat16"] / f"{graph}.onnx"
        onnx.checker.check_model(str(path), full_check=True)
        model = onnx.load(str(path), load_external_data=False)
        types = {init.data_type for init in model.graph.initializer}
        assert types == {onnx.TensorProto.BFLOAT16}
        assert all(init.data_location == onnx.TensorProto.EXTERNAL for init in model.graph.initializer)


def test_bf16_artifact_passes_verify_and_onnxruntime_cpu_is_skipped_with_the_reason(half_artifacts):
    result = verify(half_artifacts["bfloat16"], steps=8, progress=False)
    assert result.reference == "eager float32" and result.baseline is not None
    (aoti,) = result.reports
    assert aoti.runtime == "aoti" and aoti.within_tolerance, aoti
    assert "cannot run on onnxruntime's CPU execution provider" in result.skipped["onnxruntime"]
    # What the bar is made of: bf16 eager is measurably off fp32, the compiled graph no further.
    assert 0 < result.baseline["typical_kl"] <= result.baseline["mean_kl"] < 1e-2
    assert aoti.typical_kl <= 2 * result.baseline["typical_kl"] + 1e-5


def test_fp16_artifact_both_formats_pass_verify(half_artifacts):
    result = verify(half_artifacts["float16"], steps=8, progress=False)
    assert [r.runtime for r in result.reports] == ["aoti", "onnxruntime"] and not result.skipped
    assert result.within_tolerance, result


def test_half_precision_bar_rejects_a_wrong_graph(half_artifacts, monkeypatch):
    """A compiled graph that is off by more than rounding fails verify (exit 1 at the CLI)."""
    from dbrx_aot.runtimes.aoti import AotiRuntime

    real = AotiRuntime.run_graph
    noise = torch.Generator().manual_seed(0)

    def off(self, graph, tokens, positions, cache, logit_index=None):
        logits = real(self, graph, tokens, positions, cache, logit_index)
        return logits + 0.5 * torch.randn(logits.shape, generator=noise).to(logits.dtype)

    monkeypatch.setattr(AotiRuntime, "run_graph", off)
    result = verify(half_artifacts["bfloat16"], runtimes=["aoti"], steps=4, progress=False)
    assert not result.within_tolerance


def test_tolerance_rules():
    fp32 = TOLERANCES[("aoti", "float32")]
    ok = {"max_abs_error": 5e-5, "top1_agreement": 1.0, "mean_kl": 1e-9, "typical_kl": 1e-9}
    assert fp32.admits(ok) and not fp32.admits({**ok, "max_abs_error": 2e-4})
    bf16 = TOLERANCES[("aoti", "bfloat16")]
    base = {"max_abs_error": 0.8, "top1_agreement": 0.95, "typical_kl": 3e-4}
    # max |logit error| does not decide in half precision; typical KL and top-1 relative to eager's do.
    assert bf16.admits({"max_abs_error": 5.0, "top1_agreement": 0.94, "typical_kl": 5e-4}, base)
    assert not bf16.admits({"max_abs_error": 0.1, "top1_agreement": 0.99, "typical_kl": 7e-4}, base)
    assert not bf16.admits({"max_abs_error": 0.1, "top1_agreement": 0.92, "typical_kl": 1e-4}, base)
    # Never less slack than two positions: 2% of 87 is 1.7, so 85 of 87 passes against a baseline of 87,
    # and 82 against 84 (exactly at the bar: 82/87 < 84/87 - 2/87 in floating point).
    assert bf16.admits({"max_abs_error": 0.1, "top1_agreement": 85 / 87, "typical_kl": 1e-4, "positions": 87},
                       {**base, "top1_agreement": 1.0})
    assert bf16.admits({"max_abs_error": 0.1, "top1_agreement": 82 / 87, "typical_kl": 1e-4, "positions": 87},
                       {**base, "top1_agreement": 84 / 87})
    assert not bf16.admits({"max_abs_error": 0.1, "top1_agreement": 84 / 87, "typical_kl": 1e-4, "positions": 87},
                           {**base, "top1_agreement": 1.0})
    assert not bf16.admits({"max_abs_error": 0.1, "top1_agreement": 0.97, "typical_kl": 1e-4, "positions": 1000},
                           {**base, "top1_agreement": 1.0})  # 30 of 1000: the 2% bar decides
    assert isinstance(bf16, Tolerance) and bf16.relative and not fp32.relative
    with pytest.raises(AssertionError):
        bf16.admits(ok)  # a relative bar needs its baseline


def test_typical_kl_sets_aside_the_near_ties():
    """Two positions off (a rounding flip at a near-tie of the reference, each) move the mean KL but not
    the typical KL that the half-precision bar judges; a third one does."""
    from test_generate import FakeRuntime

    from dbrx_aot.verify import NEAR_TIES, compare

    class Off(FakeRuntime):
        def __init__(self, positions):
            super().__init__(batch_size=1)
            self.off = positions

        def _logits(self, tokens, positions, cache):
            logits = super()._logits(tokens, positions, cache)                   # [B, T, V], peak 10
            for p in self.off:
                logits[..., 0] += 5.0 * (positions == p)                          # argmax unchanged
            return logits

    prompt, steps = [1, 2, 3, 4, 5], 6                                            # positions 0..10
    exact = compare(FakeRuntime(batch_size=1), FakeRuntime(batch_size=1), [prompt], steps)
    assert exact["positions"] == 11 and exact["mean_kl"] == exact["typical_kl"] == 0
    two = compare(Off([3, 9]), FakeRuntime(batch_size=1), [prompt], steps)
    assert NEAR_TIES == 2 and two["mean_kl"] > 1e-3 and two["typical_kl"] == 0
    three = compare(Off([3, 9, 10]), FakeRuntime(batch_size=1), [prompt], steps)
    assert three["typical_kl"] > 1e-4 and three["top1_agreement"] == 1.0


def test_bf16_aoti_artifact_with_grouped_experts_passes_verify_and_its_export_keeps_no_weights(
        tiny_checkpoint, tmp_path, monkeypatch):
    """--moe grouped (bf16, aoti): torch._grouped_mm inside both AOTInductor packages; the manifest
    records the forms and the eager runtime on the artifact runs the same ones. The export lets go
    of the model it traced (export.trace.release_traces: on CUDA its storage is real, and a load in
    the same process would hold the weights twice)."""
    import gc
    import json
    import weakref

    import dbrx_aot
    import dbrx_aot.export.artifact
    from dbrx_aot.export import export_artifact

    traced = []

    def empty_model(*args, **kwargs):
        model = empty_model_of_export(*args, **kwargs)
        traced.extend(weakref.ref(p) for p in model.parameters())
        return model

    empty_model_of_export = dbrx_aot.export.artifact.empty_model
    monkeypatch.setattr(dbrx_aot.export.artifact, "empty_model", empty_model)
    path = export_artifact(tiny_checkpoint, tmp_path / "grouped", formats="aoti", dtype="bfloat16", moe="grouped",
                           max_seq_len=64, prefill_chunk=8, progress=False).path
    gc.collect()
    assert traced and [ref for ref in traced if ref() is not None] == []
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["moe_modes"] == {"prefill": "grouped", "decode": "grouped"}
    # torch._grouped_mm, compiled in: no project op (before torch 2.12 AOTInductor has no shim for it)
    assert manifest["graphs"]["prefill"]["aoti_ops"] == ([] if ATEN_GROUPED_MM_SHIM else ["dbrx_aot::grouped_mm"])
    eager = dbrx_aot.load_runtime(path, "eager", progress=False)
    assert (eager._prefill.moe, eager._decode.moe) == ("grouped", "grouped")
    fp32 = dbrx_aot.load_runtime(path, "eager", dtype="float32", progress=False)  # verify's reference
    assert (fp32._prefill.moe, fp32._decode.moe) == ("grouped", "grouped")  # through dbrx_aot::grouped_mm
    # 32 steps: at verify's default 8 (87 positions) near-ties of this random model flip top-1 either
    # way (aoti 82 of 87, eager bf16 84: exactly the bar's two positions of slack; KL 5e-5 as dense's).
    result = verify(path, steps=32, progress=False)
    (aoti,) = result.reports
    assert aoti.runtime == "aoti" and aoti.within_tolerance, aoti
