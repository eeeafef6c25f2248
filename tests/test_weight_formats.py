"""Weight formats (--weights int8 / bfloat16): the quantiser, the model's int8 forms against the
modules they replace, the artifact's stored bytes, and quality on a model trained on real text."""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

import onnx
import pytest
import torch
from click.testing import CliRunner

import dbrx_aot
from conftest import parity_config
from dbrx_aot.cli import cli
from dbrx_aot.errors import DbrxAotError
from dbrx_aot.manifest import Manifest
from dbrx_aot.model import CachedStep, DbrxModel, Int8Linear, Int8MoE, cache_shape, replace_weight_format
from dbrx_aot.quantize import dequantize_int8, quantize_int8, reduction_dim, scale_name
from dbrx_aot.safetensors_io import byte_ranges, open_checked

REPO = Path(__file__).resolve().parent.parent
TRAINED = REPO / "reference" / "dbrx-stdlib"


@pytest.mark.parametrize("shape, dim", [((96, 64), 1), ((4, 48, 64), 2), ((4, 48, 64), 1)])
def test_int8_round_trip_error_is_at_most_half_a_step(shape, dim):
    g = torch.Generator().manual_seed(0)
    w = torch.randn(shape, generator=g) * torch.rand(shape, generator=g) ** 4  # heavy-tailed rows
    w.select(dim - 1 if dim else 0, 0).zero_()  # an all-zero output channel: scale 0, exact
    u, scale = quantize_int8(w, dim)
    assert u.dtype == torch.uint8 and scale.dtype == torch.float32
    assert list(scale.shape) == [s for i, s in enumerate(shape) if i != dim]
    assert int(u.min()) >= 1 and int(u.max()) <= 255  # q in [-127, 127]
    error = (w - dequantize_int8(u, scale, dim)).abs()
    assert bool((error <= scale.unsqueeze(dim) / 2 + 1e-7).all()), float((error - scale.unsqueeze(dim) / 2).max())
    assert float(error.max()) > 0  # not a vacuous bound


def logits_of(model, moe, tokens):
    c = model.config
    empty = torch.zeros(cache_shape(c, tokens.shape[0], 16))
    return CachedStep(model, moe)(tokens, torch.arange(tokens.shape[1]).expand_as(tokens).contiguous(),
                                  empty.clone(), empty.clone())


@pytest.mark.parametrize("moe", ["dense", "gather"])
def test_int8_forms_equal_the_modules_they_replace_on_dequantised_weights(moe):
    """replace_weight_format("int8") against the fp32 model whose matrices hold (u - 128) * scale."""
    torch.manual_seed(0)
    model = DbrxModel(parity_config("base")).eval()
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.2)
    int8 = replace_weight_format(copy.deepcopy(model), "int8")
    assert isinstance(int8.lm_head, Int8Linear) and isinstance(int8.blocks[0].ffn, Int8MoE)
    dequantised = copy.deepcopy(model)
    params = dict(dequantised.named_parameters())
    stored = dict(int8.named_parameters())
    for name in params:
        dim = reduction_dim(name)
        if dim is not None:
            assert stored[name].dtype == torch.uint8
            params[name].data.copy_(dequantize_int8(stored[name], stored[scale_name(name)], dim))
        else:
            assert torch.equal(stored[name], params[name])  # router, norms, wte untouched
    tokens = torch.randint(0, 256, (2, 7), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        got, expected = logits_of(int8, moe, tokens), logits_of(dequantised, moe, tokens)
        assert (got - logits_of(model, moe, tokens)).abs().max() > 1e-3  # quantisation did something
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-5)


def test_bfloat16_storage_is_exact_to_a_bf16_checkpoint(tiny_checkpoint):
    """bf16 on disk, stored bf16 and computed in fp32: the very logits of the fp32 model."""
    fp32 = dbrx_aot.load_runtime(tiny_checkpoint, "eager", max_seq_len=32, prefill_chunk=8, progress=False)
    bf16 = dbrx_aot.load_runtime(tiny_checkpoint, "eager", max_seq_len=32, prefill_chunk=8, weights="bfloat16",
                                 progress=False)
    assert bf16.model.lm_head.weight.dtype == torch.bfloat16 and bf16.dtype == torch.float32
    tokens = torch.tensor([[15339, 1917, 11, 358, 1097, 264, 1296, 13, 578, 4320]])
    assert torch.equal(bf16.logits(tokens), fp32.logits(tokens))


def test_conversion_quantises_like_the_model_transform(tiny_checkpoint, weight_artifacts):
    """Streaming conversion (export) and the in-memory transform (eager weights="int8") agree bit for bit."""
    artifact = dbrx_aot.load_runtime(weight_artifacts["int8-b1"], "eager", progress=False)
    loaded = dbrx_aot.load_runtime(tiny_checkpoint, "eager", weights="int8", max_seq_len=64, prefill_chunk=8,
                                   progress=False)
    a, b = dict(artifact.model.named_parameters()), dict(loaded.model.named_parameters())
    assert a.keys() == b.keys()
    for name in a:
        assert a[name].dtype == b[name].dtype and torch.equal(a[name], b[name]), name


def test_int8_artifact_stores_each_matrix_once_and_both_formats_read_the_same_bytes(weight_artifacts):
    root = weight_artifacts["int8"]
    manifest = Manifest.read(root)
    assert manifest.weights_format == "int8" and manifest.dtype == "float32"
    dtypes = {}
    ranges = {}
    for file in sorted(set(manifest.weights.values())):
        path = root / "weights" / file
        with open_checked(path) as f:
            dtypes.update({k: f.get_slice(k).get_dtype() for k in f.keys()})
        ranges.update({k: (f"weights/{file}", *r) for k, r in byte_ranges(path).items()})
    for name, dtype in dtypes.items():
        if reduction_dim(name) is not None:
            assert dtype == "U8", name
            assert dtypes[scale_name(name)] == "F32"
        elif not name.endswith(("_scale", ".scale")):
            assert dtype == "F32", name
    assert sum(reduction_dim(n) is not None for n in dtypes) == 5 * manifest.config.n_layers + 1
    for graph in ("prefill", "decode"):
        model = onnx.load(str(root / f"{graph}.onnx"), load_external_data=False)
        for init in model.graph.initializer:
            name = init.name.removeprefix("model.")
            info = {e.key: e.value for e in init.external_data}
            assert (info["location"], int(info["offset"]), int(info["length"])) == ranges[name], name
            if reduction_dim(name) is not None:
                assert init.data_type == onnx.TensorProto.UINT8
        assert {i.name.removeprefix("model.") for i in model.graph.initializer} == set(dtypes)
    rt = dbrx_aot.load_runtime(root, "aoti", progress=False)
    for runner in (rt._prefill, rt._decode):
        assert {f.removeprefix("model.") for f in runner.get_constant_fqns()} == set(dtypes)


def test_bf16_stored_artifact_halves_the_matrix_bytes(weight_artifacts, artifacts):
    def matrix_bytes(root):
        m = Manifest.read(root)
        total = 0
        for file in set(m.weights.values()):
            with open_checked(root / "weights" / file) as f:
                total += sum(_nbytes(f, k) for k in f.keys() if reduction_dim(k) is not None)
        return total

    assert matrix_bytes(weight_artifacts["bfloat16"]) * 2 == matrix_bytes(artifacts["dense"])
    assert matrix_bytes(weight_artifacts["int8"]) * 4 == matrix_bytes(artifacts["dense"])


def _nbytes(f, key) -> int:
    n = {"F32": 4, "BF16": 2, "U8": 1}[f.get_slice(key).get_dtype()]
    for s in f.get_slice(key).get_shape():
        n *= s
    return n


@pytest.mark.parametrize("name", ["int8", "bfloat16"])
def test_verify_holds_weight_formats_to_the_fp32_bar(weight_artifacts, name):
    from dbrx_aot.verify import verify

    result = verify(weight_artifacts[name], steps=4, progress=False)
    assert [r.runtime for r in result.reports] == ["aoti", "onnxruntime"]
    assert result.baseline is None and result.within_tolerance, result.reports


def test_verify_reference_reports_held_out_perplexity(weight_artifacts, tiny_checkpoint, tmp_path):
    text = tmp_path / "held-out.py"
    text.write_text((REPO / "dbrx_aot" / "quantize.py").read_text())
    result = CliRunner().invoke(cli, ["verify", str(weight_artifacts["int8"]), "--steps", "2", "--reference",
                                      str(tiny_checkpoint), "--text", str(text), "--json", "--quiet"])
    assert result.exit_code == 0, result.output
    quality = json.loads(result.output)["quality"]
    rows = {r["runtime"]: r for r in quality["reports"]}
    assert list(rows) == ["reference", "eager", "aoti", "onnxruntime"]
    assert rows["reference"]["perplexity_change"] == 0 and rows["reference"]["top1_agreement"] == 1
    assert rows["eager"]["weights"] == "int8" and rows["eager"]["tokens"] > 500
    for name in ("aoti", "onnxruntime"):  # the compiled graphs score as their eager model does
        assert rows[name]["perplexity"] == pytest.approx(rows["eager"]["perplexity"], rel=1e-5)
    assert rows["eager"]["mean_kl"] > 0  # int8 is not the original weights


def test_verify_refuses_a_failed_perplexity_bar(weight_artifacts, tiny_checkpoint, tmp_path):
    text = tmp_path / "held-out.py"
    text.write_text((REPO / "dbrx_aot" / "quantize.py").read_text())
    result = CliRunner().invoke(cli, ["verify", str(weight_artifacts["int8"]), "--steps", "2", "--reference",
                                      str(tiny_checkpoint), "--text", str(text), "--max-perplexity-increase", "-1",
                                      "--quiet"])
    assert result.exit_code == 1 and "more than --max-perplexity-increase -1" in result.output


@pytest.mark.skipif(not (TRAINED / "config.json").is_file(), reason="reference/dbrx-stdlib not in this checkout")
def test_trained_reference_int8_perplexity_within_one_percent_of_fp32():
    """The quality oracle: a DBRX trained on the standard library, scored on modules it never saw."""
    sys.path.insert(0, str(REPO / "scripts"))
    from train_reference import held_out_text

    from dbrx_aot.quality import measure

    shapes = dict(max_seq_len=256, prefill_chunk=64, progress=False)
    reference = dbrx_aot.load_runtime(TRAINED, "eager", **shapes)
    ids = reference.tokenizer.encode(held_out_text())
    windows = [ids[i:i + 256] for i in range(0, 1024, 256)]
    runtimes = {fmt: dbrx_aot.load_runtime(TRAINED, "eager", weights=fmt, **shapes) for fmt in ("int8", "bfloat16")}
    stats = measure(runtimes, reference, windows, progress=False)
    ppl = {name: torch.tensor(s["nll"] / s["n"]).exp().item() for name, s in stats.items()}
    # It learned Python: a uniform guess is 100352, the training split's unigram frequencies 1753 and
    # an interpolated bigram model 488 on this held-out split; the reference scores about 200.
    assert ppl["reference"] < 400
    assert ppl["bfloat16"] == pytest.approx(ppl["reference"], rel=1e-9)  # the checkpoint is bf16: exact
    assert abs(ppl["int8"] / ppl["reference"] - 1) < 0.01
    assert stats["int8"]["top1"] / stats["int8"]["n"] > 0.95


def test_weight_format_errors(tiny_checkpoint, weight_artifacts, tmp_path):
    from dbrx_aot.export import export_artifact

    with pytest.raises(DbrxAotError, match="--weights bfloat16 goes with --dtype float32"):
        export_artifact(tiny_checkpoint, tmp_path / "x", dtype="bfloat16", weights_format="bfloat16", progress=False)
    with pytest.raises(DbrxAotError, match="--weights int4: expected one of same, bfloat16, int8"):
        export_artifact(tiny_checkpoint, tmp_path / "x", weights_format="int4", progress=False)
    assert not (tmp_path / "x").exists()
    with pytest.raises(DbrxAotError, match="already stored as int8"):
        dbrx_aot.load_runtime(weight_artifacts["int8"], "eager", weights="bfloat16", progress=False)
    result = CliRunner().invoke(cli, ["verify", str(weight_artifacts["int8"]), "--reference", str(tiny_checkpoint)])
    assert result.exit_code == 2 and "--reference and --text go together" in result.output
    result = CliRunner().invoke(cli, ["export", str(tiny_checkpoint), "-o", str(tmp_path / "y"), "--weights", "int4"])
    assert result.exit_code == 2 and "int4" in result.output
    result = CliRunner().invoke(cli, ["export", str(tiny_checkpoint), "-o", str(tmp_path / "y"), "--format", "onnx",
                                      "--onnx-accuracy-level", "4"])
    assert result.exit_code == 2 and "--onnx-accuracy-level goes with --weights int8" in result.output
    assert not (tmp_path / "y").exists()


def test_onnx_forms_equal_the_modules_they_replace():
    """What the ONNX export traces (export/onnx.py: onnx_forms) against the model it was made from."""
    from dbrx_aot.export.onnx import DequantizeLinearMoE, MatMulNBitsLinear, matmul_block_size, onnx_forms

    torch.manual_seed(0)
    model = DbrxModel(parity_config("base")).eval()
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.2)
    model = replace_weight_format(model, "int8")
    tokens = torch.randint(0, 256, (2, 5), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = {moe: logits_of(model, moe, tokens) for moe in ("dense", "gather")}
        onnx_forms(model, accuracy_level=4)
        assert type(model.lm_head) is MatMulNBitsLinear and model.lm_head.accuracy_level == 4
        assert type(model.blocks[0].ffn) is DequantizeLinearMoE and model.blocks[0].ffn.gather_matmul
        for moe, logits in expected.items():  # the custom ops' own kernels are the same math
            torch.testing.assert_close(logits_of(model, moe, tokens), logits, atol=1e-5, rtol=1e-5)
    assert [matmul_block_size(k) for k in (64, 96, 512, 6144)] == [64, 32, 256, 256]
    with pytest.raises(DbrxAotError, match="not a multiple of 16"):
        matmul_block_size(40)


def test_onnx_int8_activations_artifact_reads_the_same_bytes_and_has_its_own_bar(weight_artifacts):
    from dbrx_aot.verify import verify

    root = weight_artifacts["int8-acc4"]
    assert Manifest.read(root).onnx_accuracy_level == 4
    model = onnx.load(str(root / "decode.onnx"), load_external_data=False)
    nodes = [n for n in model.graph.node if n.op_type == "MatMulNBits"]
    assert len(nodes) == 2 * 2 + 1  # Wqkv, out_proj per layer, lm_head
    assert {a.name: a.i for a in nodes[0].attribute}["bits"] == 8
    assert all(i.data_type == onnx.TensorProto.UINT8 for i in model.graph.initializer if reduction_dim(i.name[6:]))
    (report,) = verify(root, steps=8, progress=False).reports
    assert report.within_tolerance and report.tolerance.min_top1 == 0.9, report
    assert report.mean_kl > 1e-9  # int8 activations are not exact: the fp32 bar would be the wrong one


def test_memory_plan_of_the_released_model():
    from dbrx_aot.config import preset
    from dbrx_aot.inspection import memory_plan

    config = preset("dbrx-132b")
    same, int8 = memory_plan(config, "bfloat16", "same"), memory_plan(config, "bfloat16", "int8")
    assert same["total_bytes"] == 2 * config.param_count() == 263_193_047_040  # FACTS.md: the released bytes
    assert not same["devices"]["H200 141GB"]["fits"]
    assert not int8["devices"]["H100 80GB"]["fits"] and int8["devices"]["H200 141GB"]["fits"]
    assert int8["kv_bytes_per_token"] == 160 * 1024
    assert 2 * 32768 <= int8["devices"]["H200 141GB"]["kv_tokens"] < 3 * 32768
    result = CliRunner().invoke(cli, ["inspect", "--preset", "dbrx-132b"])
    assert result.exit_code == 0 and "132.29 GB" in result.output and "2 x 32k" in result.output
