"""AOTInductor artifacts against eager, and every way loading one can go wrong."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
import zipfile

import pytest
import torch
from click.testing import CliRunner

import dbrx_aot
import dbrx_aot.export
from conftest import TOLERANCE, copy_artifact, parity_config
from dbrx_aot.cli import cli
from dbrx_aot.errors import DbrxAotError

def test_rowdot_linear_equals_linear():
    from dbrx_aot.model import DbrxModel, use_rowdot
    from conftest import parity_config

    torch.manual_seed(0)
    model = DbrxModel(parity_config("base"))
    x = torch.randn(1, 1, 64)
    expected = [model.blocks[0].attn.Wqkv(x), model.lm_head(x), model.blocks[1].ffn.router(x)]
    use_rowdot(model)
    assert model.lm_head.rowdot and model.blocks[1].ffn.router.rowdot
    assert [n for n, _ in model.named_parameters()] == [n for n, _ in DbrxModel(parity_config("base")).named_parameters()]
    got = [model.blocks[0].attn.Wqkv(x), model.lm_head(x), model.blocks[1].ffn.router(x)]
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("case", ["base", "clip_none_mha", "clip_active_mqa", "topk_all_odd"])
def test_sdpa_attention_equals_the_written_out_one(case):
    """use_sdpa (--attention sdpa) against the module it replaces: chunks at a cache offset, a
    ragged batch, one-token decode; GQA, MHA and MQA."""
    from dbrx_aot.model import CachedStep, DbrxModel, cache_shape, use_sdpa

    torch.manual_seed(0)
    config = parity_config(case)
    model = DbrxModel(config).eval().requires_grad_(False)
    for p in model.parameters():  # the expert tensors are made uninitialised
        p.normal_(0, 0.2)
    sdpa = use_sdpa(copy.deepcopy(model))
    assert all(b.attn.sdpa for b in sdpa.blocks) and not any(b.attn.sdpa for b in model.blocks)
    cache = torch.randn(cache_shape(config, 2, 32))
    for T, start in ((8, 0), (8, 11), (1, 25)):
        tokens = torch.randint(0, config.vocab_size, (2, T))
        positions = (torch.arange(T) + torch.tensor([[start], [start + 3]])).contiguous()
        caches = [(cache.clone(), cache.clone()) for _ in range(2)]
        with torch.no_grad():
            want = CachedStep(model, "dense")(tokens, positions, *caches[0])
            got = CachedStep(sdpa, "dense")(tokens, positions, *caches[1])
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(caches[1][0], caches[0][0])


def test_attention_form_per_graph(artifacts, tiny_checkpoint, tmp_path):
    """auto on CPU: sdpa for prefill, the written-out form for decode; recorded per graph."""
    from dbrx_aot.export.artifact import export_artifact

    graphs = json.loads((artifacts["auto"] / "manifest.json").read_text())["graphs"]
    assert (graphs["prefill"]["aoti_attention"], graphs["decode"]["aoti_attention"]) == ("sdpa", "math")
    # The CPU prefill graph attends within cache extents 0, P, 4P below S (S=64, P=8); decode over all S.
    assert (graphs["prefill"]["aoti_attention_extents"], graphs["decode"]["aoti_attention_extents"]) == ([0, 8, 32], [])
    with pytest.raises(DbrxAotError, match="--attention flash: expected one of auto, math, sdpa"):
        export_artifact(tiny_checkpoint, tmp_path / "x", attention="flash", progress=False)


def test_moe_kernel_per_graph(artifacts, tiny_checkpoint, tmp_path):
    """auto: Inductor's gather everywhere (the Triton kernels are CUDA only, and not the default
    before a GPU run measures them); a graph without a gather has no kernel to swap."""
    from dbrx_aot.export.trace import GraphSpec, resolve_moe_kernel

    graphs = json.loads((artifacts["gather"] / "manifest.json").read_text())["graphs"]
    assert graphs["prefill"]["aoti_moe_kernel"] == graphs["decode"]["aoti_moe_kernel"] == "inductor"
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    decode, prefill = GraphSpec("decode", 1, "gather"), GraphSpec("prefill", 64, "dense")
    assert resolve_moe_kernel("triton", decode, cuda) == "triton"
    assert resolve_moe_kernel("triton", prefill, cuda) == "inductor"
    assert resolve_moe_kernel("auto", decode, cuda) == "inductor"
    with pytest.raises(DbrxAotError, match="--moe-kernel triton: the Triton kernels compile for CUDA only, not "
                                           "--device cpu"):
        dbrx_aot.export.export_artifact(tiny_checkpoint, tmp_path / "x", moe_kernel="triton", progress=False)
    with pytest.raises(DbrxAotError, match="--moe-kernel cutlass: expected one of auto, inductor, triton"):
        resolve_moe_kernel("cutlass", decode, cpu)
    assert not (tmp_path / "x").exists()


def test_cpu_decode_at_batch_1_uses_rowdot_only_on_narrow_weights(artifacts, weight_artifacts):
    def linear(path):
        graphs = json.loads((path / "manifest.json").read_text())["graphs"]
        return graphs["prefill"]["aoti_linear"], graphs["decode"]["aoti_linear"]

    assert linear(artifacts["gather"]) == ("mm", "mm")              # batch 1, fp32 weights: BLAS
    assert linear(artifacts["auto"]) == ("mm", "mm")                # batch 2: a real matrix product
    assert linear(weight_artifacts["int8-b1"]) == ("mm", "rowdot")  # dequantised as it streams
    assert linear(weight_artifacts["bfloat16"]) == ("mm", "rowdot")  # upcast as it streams


def test_manifest_records_the_build(artifacts):
    manifest = json.loads((artifacts["auto"] / "manifest.json").read_text())
    assert manifest["format_version"] == 2 and manifest["versions"]["torch"] == torch.__version__
    assert manifest["moe_modes"] == {"prefill": "dense", "decode": "gather"}
    assert (manifest["batch_size"], manifest["max_seq_len"], manifest["prefill_chunk"]) == (2, 64, 8)
    assert manifest["graphs"]["decode"]["inputs"][2] == {"name": "k_cache", "shape": [2, 2, 2, 64, 16],
                                                         "dtype": "float32"}
    assert set(manifest["files"]) >= {"aoti/prefill.pt2", "aoti/decode.pt2"}
    assert all(len(f["sha256"]) == 64 for f in manifest["files"].values())
    # The packages hold no weights: each is far smaller than the weights they run.
    weights = sum(f["bytes"] for rel, f in manifest["files"].items() if rel.startswith("weights/"))
    assert manifest["files"]["aoti/decode.pt2"]["bytes"] < weights / 5


def test_weights_are_shared_not_copied(artifacts):
    """Both packages run on the runtime's one dict of weights (user-managed constants)."""
    rt = dbrx_aot.load_runtime(artifacts["auto"], "aoti", progress=False)
    cache = rt.new_cache()
    tokens = torch.zeros(2, 1, dtype=torch.int64)
    before = rt.decode(tokens, torch.zeros(2, 1, dtype=torch.int64), cache)
    with torch.no_grad():
        rt.weights["lm_head.weight"].mul_(2)
    after = rt.decode(tokens, torch.zeros(2, 1, dtype=torch.int64), rt.new_cache())
    with torch.no_grad():
        rt.weights["lm_head.weight"].div_(2)
    torch.testing.assert_close(after, 2 * before, atol=1e-4, rtol=1e-5)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the version script is for GNU linkers (Linux)")
def test_packages_export_only_aotinductors_c_api(artifacts, tmp_path):
    """Each package's .so exports AOTInductor's C API and nothing else (export.aoti.C_API_ONLY):
    without it, a decode package's .so exports some 390 C++ template instances, std::regex's among
    them, which libtorch and libc10 export too, built by another compiler. And it imports no C++:
    its libstdc++ is linked in, so it needs no libstdc++.so and binds no std:: symbol to the
    process's (without that, a decode .so imports some 90, std::locale's and use_facet's among them)."""
    for graph in ("prefill", "decode"):
        with zipfile.ZipFile(artifacts["auto"] / "aoti" / f"{graph}.pt2") as package:
            (so,) = [package.extract(n, tmp_path / graph) for n in package.namelist() if n.endswith(".so")]
        listed = subprocess.run(["nm", "-D", "--defined-only", so], capture_output=True, text=True, check=True)
        exported = [line.split()[-1] for line in listed.stdout.splitlines()]
        assert "AOTInductorModelContainerCreateWithDevice" in exported and "AOTInductorModelContainerRun" in exported
        assert [name for name in exported if not name.startswith("AOTInductor")] == [], graph
        listed = subprocess.run(["nm", "-D", "--undefined-only", so], capture_output=True, text=True, check=True)
        imported = [line.split() for line in listed.stdout.splitlines()]
        cxx = [name for kind, name in imported if kind == "U" and (name.startswith("_Z") or "@GLIBCXX" in name
                                                                   or "@CXXABI" in name)]
        assert cxx == [], (graph, cxx[:5])
        needed = subprocess.run(["readelf", "-d", so], capture_output=True, text=True, check=True).stdout
        assert "libtorch" in needed and "libstdc++" not in needed, graph


def test_packages_opened_without_torchs_package_loader_give_the_same_logits(artifacts, monkeypatch):
    """DBRX_AOT_AOTI_LOADER=container: each .pt2's .so extracted and opened by AOTInductor's
    container runner alone (the way round an image whose package loader crashes, as the H200's did
    in every process that had not compiled its package), and =deepbind: the same, the .so opened
    with RTLD_DEEPBIND first: bit-identical logits over a ragged prefill and decode steps, weights
    bound as user-managed constants all the same. None of the three reads the machine Inductor's
    way (builds and pythons: seconds a process; runtimes.aoti.compiled_here reads it)."""
    from torch._inductor import codecache

    def builds(*args):
        raise AssertionError("the loader ran Inductor's reading of the machine")

    monkeypatch.setattr(codecache, "get_device_information", builds)
    ids = torch.randint(0, 1000, (2, 11), generator=torch.Generator().manual_seed(3))
    lengths, steps = [11, 4], 3
    out = {}
    for loader in ("package", "container", "deepbind"):
        monkeypatch.setenv("DBRX_AOT_AOTI_LOADER", loader)
        rt = dbrx_aot.load_runtime(artifacts["auto"], "aoti", progress=False)
        out[loader] = (rt.logits(ids), dbrx_aot.generate(rt, [ids[0, :n].tolist() for n in lengths],
                                                          max_new_tokens=steps, temperature=0, stop_ids=[]))
        if loader != "package":
            assert type(rt._decode).__name__ == "ContainerPackage"
            assert (rt._decode._deepbound is not None) == (loader == "deepbind")
    for loader in ("container", "deepbind"):
        assert torch.equal(out["package"][0], out[loader][0]) and out["package"][1] == out[loader][1]
    monkeypatch.setenv("DBRX_AOT_AOTI_LOADER", "zip")
    assert "DBRX_AOT_AOTI_LOADER='zip': expected one of package, container, deepbind" in error_of(artifacts["auto"])


def test_a_package_compiled_for_another_machine_is_refused_saying_what_differs(artifacts, monkeypatch):
    """A package's metadata (AOTI_*) against this machine: CPU kernels for vector instructions the CPU
    lacks (SIGILL at the first call otherwise), another machine, a GPU of another generation or an
    older one of the same: refused before the load; CUDA kernels on a newer GPU of their generation,
    or a CUDA package's CPU code on a narrower CPU: a warning."""
    from dbrx_aot.runtimes import aoti

    cpu = {"AOTI_PLATFORM": "linux", "AOTI_MACHINE": "x86_64", "AOTI_CPU_ISA": "AVX512 AVX512_VNNI",
           "AOTI_DEVICE_KEY": "cpu", "AOTI_COMPUTE_CAPABILITY": ""}
    here = {"AOTI_PLATFORM": "linux", "AOTI_MACHINE": "x86_64", "AOTI_CPU_ISA": "AVX2"}
    assert aoti.compiled_elsewhere(cpu, here) == (["compiled for a CPU with AVX512 AVX512_VNNI, this one lacks "
                                                   "AVX512 AVX512_VNNI"], [])
    assert aoti.compiled_elsewhere(cpu, {**here, "AOTI_CPU_ISA": "AVX2 AVX512 AVX512_VNNI AMX_TILE"}) == ([], [])
    assert aoti.compiled_elsewhere({**cpu, "AOTI_CPU_ISA": "INVALID_VEC_ISA"}, here) == ([], [])
    assert aoti.compiled_elsewhere(cpu, {"AOTI_PLATFORM": "linux", "AOTI_MACHINE": "aarch64"})[0] == [
        "compiled for machine x86_64, this is aarch64"]
    cuda = {**cpu, "AOTI_DEVICE_KEY": "cuda", "AOTI_COMPUTE_CAPABILITY": "90"}
    gpu = {**here, "AOTI_CPU_ISA": "AVX512 AVX512_VNNI"}
    assert aoti.compiled_elsewhere(cuda, {**gpu, "AOTI_COMPUTE_CAPABILITY": "90"}) == ([], [])
    said = "compiled for a GPU of compute capability {}, this one is {}"
    for built, there, refused in (("90", "100", True), ("90", "80", True), ("86", "80", True), ("80", "86", False)):
        line = [said.format(f"{built[:-1]}.{built[-1]}", f"{there[:-1]}.{there[-1]}")]
        assert aoti.compiled_elsewhere({**cuda, "AOTI_COMPUTE_CAPABILITY": built}, {
            **gpu, "AOTI_COMPUTE_CAPABILITY": there}) == ((line, []) if refused else ([], line)), (built, there)
    assert aoti.compiled_elsewhere(cuda, {**here, "AOTI_COMPUTE_CAPABILITY": "90"})[1] == [
        "compiled for a CPU with AVX512 AVX512_VNNI, this one lacks AVX512 AVX512_VNNI"]
    # This machine reads as what the suite's packages were compiled for; one whose CPU has no vector
    # ISA at all refuses them (where they have vector code), naming the package.
    meta = torch._C._aoti.AOTIModelPackageLoader.load_metadata_from_package(
        str(artifacts["auto"] / "aoti" / "decode.pt2"), "model")
    assert aoti.compiled_elsewhere(meta, aoti.compiled_here(torch.device("cpu"))) == ([], [])
    if meta["AOTI_CPU_ISA"] not in ("", "INVALID_VEC_ISA"):
        real = aoti.compiled_here
        monkeypatch.setattr(aoti, "compiled_here", lambda device: {**real(device), "AOTI_CPU_ISA": ""})
        assert error_of(artifacts["auto"]).endswith(
            f"prefill.pt2: compiled for a CPU with {meta['AOTI_CPU_ISA']}, this one lacks "
            f"{' '.join(sorted(meta['AOTI_CPU_ISA'].split()))} (re-export on this machine)")


def error_of(path, **kw):
    with pytest.raises(DbrxAotError) as err:
        dbrx_aot.load_runtime(path, "aoti", progress=False, **kw)
    return str(err.value)


def test_tampered_weights(artifacts, tmp_path):
    art = copy_artifact(artifacts["auto"], tmp_path / "a")
    weights = sorted((art / "weights").iterdir())[0]
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    assert "sha256 does not match" in error_of(art) and weights.name in error_of(art)
    dbrx_aot.load_runtime(art, "aoti", progress=False, verify_checksums=False)  # the opt-out


def test_other_torch_version(artifacts, tmp_path):
    art = copy_artifact(artifacts["auto"], tmp_path / "a")
    manifest = json.loads((art / "manifest.json").read_text())
    manifest["versions"]["torch"] = "2.9.0+cu128"
    (art / "manifest.json").write_text(json.dumps(manifest))
    assert "built by torch 2.9.0+cu128" in error_of(art)


def test_unknown_format_version(artifacts, tmp_path):
    art = copy_artifact(artifacts["auto"], tmp_path / "a")
    manifest = json.loads((art / "manifest.json").read_text())
    manifest["format_version"] = 99
    (art / "manifest.json").write_text(json.dumps(manifest))
    assert "format_version=99" in error_of(art)


def test_missing_package(artifacts, tmp_path):
    art = copy_artifact(artifacts["auto"], tmp_path / "a")
    (art / "aoti" / "decode.pt2").unlink()
    assert "decode.pt2: missing" in error_of(art)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU error")
def test_cuda_asked_without_gpu(artifacts):
    assert "CUDA is not available" in error_of(artifacts["auto"], device="cuda")
    result = CliRunner().invoke(cli, ["generate", str(artifacts["auto"]), "--runtime", "aoti", "--device", "cuda",
                                      "--prompt", "hi"])
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert result.output.startswith("error: --device cuda: CUDA is not available")


def test_interrupted_export_leaves_nothing(tiny_checkpoint, tmp_path, monkeypatch):
    import dbrx_aot.export.aoti as aoti

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(aoti, "compile_package", interrupted)
    out = tmp_path / "art"
    with pytest.raises(KeyboardInterrupt):
        dbrx_aot.export.export_artifact(tiny_checkpoint, out, formats="aoti", progress=False, max_seq_len=32)
    assert list(tmp_path.iterdir()) == []  # neither the target nor the temporary directory


def test_full_disk_during_export(tiny_checkpoint, tmp_path, monkeypatch):
    import errno

    import dbrx_aot.export.artifact as artifact

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "x"))

    monkeypatch.setattr(artifact, "convert_weights", full)
    with pytest.raises(DbrxAotError, match="disk full.*nothing was left behind"):
        dbrx_aot.export.export_artifact(tiny_checkpoint, tmp_path / "art", progress=False, max_seq_len=32)
    assert list(tmp_path.iterdir()) == []


def test_compiles_sharing_an_inductor_cache_take_turns(tmp_path, monkeypatch, caplog):
    """export.aoti.compile_lock: a second compile in the same Inductor cache directory waits (and
    says why) until the first has packaged its .pt2; it proceeds once the first lets go."""
    import logging
    import threading

    from dbrx_aot.export.aoti import compile_lock

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))
    entered = threading.Event()

    def second():
        with compile_lock():
            entered.set()

    with caplog.at_level(logging.INFO, logger="dbrx_aot"):
        with compile_lock():
            thread = threading.Thread(target=second)
            thread.start()
            assert not entered.wait(0.5)  # held: the second compile waits
        assert entered.wait(10)
        thread.join()
    assert f"waiting for another process's compile in {tmp_path}" in caplog.text


def test_verification_runs_a_compiled_chunk_once_per_position_it_compares(artifacts, monkeypatch):
    """The prefill graph returns one position per row, so every-position logits cost a graph call a
    position: logits() and verify ask only for the prompt's positions, not the chunk's padding."""
    from dbrx_aot.verify import teacher_forced

    rt = dbrx_aot.load_runtime(artifacts["gather"], "aoti", progress=False)  # B=1, P=8
    eager = dbrx_aot.load_runtime(artifacts["gather"], "eager", progress=False)
    calls = []
    real = type(rt).run_graph
    monkeypatch.setattr(type(rt), "run_graph", lambda self, graph, *a: calls.append(graph) or real(self, graph, *a))
    ids = torch.arange(11)[None]                                    # chunks of 8 and 3 tokens
    torch.testing.assert_close(rt.logits(ids), eager.logits(ids), atol=TOLERANCE[("aoti", torch.float32)], rtol=0)
    assert calls == ["prefill"] * 11
    calls.clear()
    assert sum(1 for _ in teacher_forced(rt, eager, [list(range(5))], steps=2)) == 5 + 2
    assert calls == ["prefill"] * 5 + ["decode"] * 2


def test_skip_weights_artifact_refuses_to_run(gpu_check_dry_run):
    # A compile-only export of a preset with no checkpoint (as for dbrx-132b; the GPU check's
    # slice: `export --preset small --layers 1 --skip-weights`): no weights to run.
    path = gpu_check_dry_run.work / "slice-batch1"
    assert (path / "manifest.json").is_file() and not (path / "weights").exists()
    assert "--skip-weights" in error_of(path)


@pytest.mark.slow
def test_dbrx_132b_graphs_compile_in_a_few_gb(tmp_path):
    """The released configuration's two graphs compile without weights, in little memory."""
    import resource
    import subprocess
    import sys

    out = tmp_path / "132b"
    subprocess.run([sys.executable, "-m", "dbrx_aot.cli", "--quiet", "export", "--preset", "dbrx-132b",
                    "--skip-weights", "-o", str(out), "--dtype", "bfloat16", "--max-seq-len", "4096"], check=True)
    peak_gb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1e6
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["config"]["d_model"] == 6144 and manifest["weights"] == {}
    assert peak_gb < 4, peak_gb


def test_fp32_grouped_experts_through_the_project_op_pass_verify(tiny_checkpoint, tmp_path):
    """auto on CPU in fp32, 16 token slots an expert (B=1, P=64, k=4, E=16): the AOTInductor prefill
    graph groups its experts through dbrx_aot::grouped_mm (torch's export refuses fp32
    torch._grouped_mm), called by the package's proxy executor, while the same artifact's ONNX
    prefill stays dense (ONNX has no grouped product); both exact to eager within fp32's bar."""
    import zipfile

    from dbrx_aot.export import export_artifact
    from dbrx_aot.inspection import describe, format_text
    from dbrx_aot.verify import verify

    path = export_artifact(tiny_checkpoint, tmp_path / "grouped", formats="aoti,onnx", batch_size=1,
                           max_seq_len=128, prefill_chunk=64, progress=False).path
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["moe_modes"] == {"prefill": "grouped", "decode": "gather"}
    assert {g: manifest["graphs"][g]["onnx_moe"] for g in manifest["graphs"]} == {"prefill": "dense",
                                                                                  "decode": "gather"}
    assert "MoE auto (prefill grouped, decode gather; onnx prefill dense)" in format_text(describe(path))
    assert {g: manifest["graphs"][g]["aoti_ops"] for g in manifest["graphs"]} == {
        "prefill": ["dbrx_aot::grouped_mm"], "decode": []}
    with zipfile.ZipFile(path / "aoti" / "prefill.pt2") as package:
        assert any(b"dbrx_aot::grouped_mm" in package.read(n) for n in package.namelist() if n.endswith(".json"))
    assert dbrx_aot.load_runtime(path, "eager", progress=False)._prefill.moe == "grouped"
    reports = verify(path, steps=8, progress=False).reports
    assert [r.runtime for r in reports] == ["aoti", "onnxruntime"]
    for r in reports:
        assert r.within_tolerance and r.top1_agreement == 1.0, r
