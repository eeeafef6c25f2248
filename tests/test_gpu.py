"""CUDA: what the GPU check (`make gpu-check`, scripts/gpu_check.py) proves. Skipped without a GPU.

The artifacts are exported once per session, on the GPU, from the tiny preset (compiles are slow);
under the GPU check, once per run (cuda_artifact).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import dbrx_aot
from conftest import ARTIFACT_SHAPES, TOLERANCE, load_script
from dbrx_aot.runtimes import prefill_chunks
from test_ladder import STEPS, check_long_and_ragged_prompts, check_prefill_and_decode, check_two_caches, prompt

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(),
                                 reason=f"no CUDA device (torch {torch.__version__})")]


@pytest.fixture(scope="session")
def cuda_artifact(tiny_checkpoint, tmp_path_factory):
    """(dtype, --moe-kernel) -> an aoti artifact exported with --device cuda (batch 2: its decode graph
    gathers the experts), built on first use. Under the GPU check they are kept in the folder that
    its TEST_ARTIFACTS_ENV names, so that its last pytest run (the fresh-process tests) loads the
    first run's instead of compiling them again."""
    from dbrx_aot.export import export_artifact

    kept = os.environ.get(load_script("gpu_check").TEST_ARTIFACTS_ENV)
    root = Path(kept) if kept else tmp_path_factory.mktemp("cuda-artifacts")

    def get(dtype: str, moe_kernel: str = "auto"):
        path = root / f"{dtype}-{moe_kernel}"
        if not (path / "manifest.json").is_file():  # an export renames its whole folder into place at the end
            export_artifact(tiny_checkpoint, path, formats="aoti", device="cuda", dtype=dtype, moe_kernel=moe_kernel,
                            force=True, progress=False, **ARTIFACT_SHAPES)
        return path

    return get


@pytest.fixture(scope="session")
def fp32_pair(cuda_artifact):
    """(aoti on CUDA with its default CUDA graphs, eager on CUDA), fp32, the same weights."""
    path = cuda_artifact("float32")
    return (dbrx_aot.load_runtime(path, "aoti", device="cuda", progress=False),
            dbrx_aot.load_runtime(path, "eager", device="cuda", progress=False))


def test_eager_cuda_fp32_matches_eager_cpu(tiny_checkpoint):
    shapes = dict(batch_size=2, max_seq_len=64, prefill_chunk=8, dtype="float32", progress=False)
    gpu = dbrx_aot.load_runtime(tiny_checkpoint, "eager", device="cuda", **shapes)
    cpu = dbrx_aot.load_runtime(tiny_checkpoint, "eager", device="cpu", **shapes)
    assert gpu.device.type == "cuda" and gpu.dtype == torch.float32
    atol = TOLERANCE[("aoti", torch.float32)]  # different kernels, same math: the compiled-runtime bar
    ids = torch.tensor([prompt(13, seed=0), prompt(13, seed=1)])
    torch.testing.assert_close(gpu.logits(ids).cpu(), cpu.logits(ids), atol=atol, rtol=0)
    c_gpu, c_cpu = gpu.new_cache(), cpu.new_cache()
    for _, tokens, positions in prefill_chunks(ids.tolist(), 8, 64):
        gpu.prefill(tokens, positions, c_gpu)
        expected = cpu.prefill(tokens, positions, c_cpu)
    nxt = expected[:, 13 - 8 - 1].argmax(-1)
    for step in range(STEPS):
        positions = torch.full((2, 1), 13 + step)
        expected = cpu.decode(nxt[:, None], positions, c_cpu)
        torch.testing.assert_close(gpu.decode(nxt[:, None], positions, c_gpu).cpu(), expected, atol=atol, rtol=0,
                                   msg=f"decode step {step}")
        nxt = expected[:, 0].argmax(-1)
    prompts = [prompt(9, seed=2), prompt(4, seed=3)]
    assert dbrx_aot.generate(gpu, prompts, max_new_tokens=STEPS, stop_ids=[]) == \
        dbrx_aot.generate(cpu, prompts, max_new_tokens=STEPS, stop_ids=[])


def test_cuda_aoti_fp32_prefill_and_32_decode_steps_match_eager(fp32_pair):
    aoti, eager = fp32_pair
    assert aoti.device.type == "cuda" and aoti.cuda_graphs  # on by default on CUDA
    check_prefill_and_decode(aoti, eager, atol=TOLERANCE[("aoti", torch.float32)])


def test_cuda_aoti_fp32_long_and_ragged_prompts(fp32_pair):
    check_long_and_ragged_prompts(*fp32_pair)


def test_cuda_aoti_fp32_two_caches_do_not_interfere(fp32_pair):
    check_two_caches(fp32_pair[0])


def test_cuda_aoti_bf16_within_the_bf16_tolerance_of_eager(cuda_artifact):
    from dbrx_aot.verify import format_table, verify

    result = verify(cuda_artifact("bfloat16"), ["aoti"], device="cuda", steps=32, progress=False)
    assert result.reference == "eager float32" and result.within_tolerance, format_table(result)


def test_cuda_aoti_triton_gather_kernels_prefill_and_32_decode_steps_match_eager(cuda_artifact, fp32_pair):
    """--moe-kernel triton: the decode graph's gathered experts on moe_kernels' Triton kernels, held to
    the fp32 ladder against eager's PyTorch gather form."""
    path = cuda_artifact("float32", "triton")
    graphs = json.loads((path / "manifest.json").read_text())["graphs"]
    assert (graphs["prefill"]["aoti_moe_kernel"], graphs["decode"]["aoti_moe_kernel"]) == ("inductor", "triton")
    aoti = dbrx_aot.load_runtime(path, "aoti", device="cuda", progress=False)
    check_prefill_and_decode(aoti, fp32_pair[1], atol=TOLERANCE[("aoti", torch.float32)])


def test_cuda_aoti_bf16_triton_gather_kernels_within_the_bf16_tolerance_of_eager(cuda_artifact):
    from dbrx_aot.verify import format_table, verify

    result = verify(cuda_artifact("bfloat16", "triton"), ["aoti"], device="cuda", steps=32, progress=False)
    assert result.reference == "eager float32" and result.within_tolerance, format_table(result)


@pytest.mark.parametrize("dtype, moe_kernel", [("float32", "auto"), ("bfloat16", "auto"), ("bfloat16", "triton")])
def test_cuda_graphs_on_and_off_are_bit_identical(cuda_artifact, dtype, moe_kernel):
    path = cuda_artifact(dtype, moe_kernel)
    on = dbrx_aot.load_runtime(path, "aoti", device="cuda", progress=False, cuda_graphs=True)
    off = dbrx_aot.load_runtime(path, "aoti", device="cuda", progress=False, cuda_graphs=False)
    assert on.cuda_graphs and not off.cuda_graphs
    ids = torch.tensor([prompt(8, seed=4), prompt(8, seed=5)])
    c_on, c_off = on.new_cache(), off.new_cache()
    nxt = on.prefill(ids, torch.arange(8).expand(2, 8), c_on)[:, -1].argmax(-1)
    off.prefill(ids, torch.arange(8).expand(2, 8), c_off)
    for step in range(STEPS):
        positions = torch.full((2, 1), 8 + step)
        x, y = on.decode(nxt[:, None], positions, c_on), off.decode(nxt[:, None], positions, c_off)
        assert torch.equal(x, y), f"decode step {step}: max diff {(x - y).abs().max().item()}"
        nxt = x[:, 0].argmax(-1)
    assert torch.equal(c_on.k, c_off.k) and torch.equal(c_on.v, c_off.v)
    assert on.decode_graphs.captures == 1  # every step but the first replayed the one graph
    prompts = [prompt(11, seed=6), prompt(3, seed=7)]
    assert dbrx_aot.generate(on, prompts, max_new_tokens=STEPS, temperature=0.8, seed=0, stop_ids=[]) == \
        dbrx_aot.generate(off, prompts, max_new_tokens=STEPS, temperature=0.8, seed=0, stop_ids=[])


@pytest.mark.fresh_process
def test_cuda_aoti_artifact_runs_in_processes_that_did_not_compile_it(cuda_artifact):
    """As users run it: verify in a fresh process (CUDA graphs on), bench in the CLI's own process
    (--in-process, graphs off) and in the process of its own it spawns (graphs on). The first H200
    run's bench processes died there (no message, at the small preset's and the slice's sizes) while
    the tests above, which load in the process that compiled, passed. Every command runs even when
    one fails, so that the failure says which ways of starting a process die, but one that dies in
    AOTInductor's loader stops the rest (the second H200 run's every way died there, ~60 s each; the
    GPU check's load probe says more); each has 120 s, and a hang stops the rest (a hang fails this
    test, not the whole GPU check's pytest run of 420 s)."""
    path = str(cuda_artifact("bfloat16"))
    cli = [sys.executable, "-X", "faulthandler", "-m", "dbrx_aot.cli"]
    bench = [*cli, "bench", path, "--device", "cuda", "--runtime", "aoti", "--prompt-len", "8", "--new-tokens", "4",
             "--json"]
    runs = {"verify": [*cli, "verify", path, "--runtime", "aoti", "--device", "cuda", "--steps", "8"],
            "bench --in-process --no-cuda-graphs": [*bench, "--in-process", "--no-cuda-graphs"],
            "bench --cuda-graphs": [*bench, "--cuda-graphs"]}
    outcomes, failures = {}, []
    for name, cmd in runs.items():
        try:
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        except subprocess.TimeoutExpired:
            outcomes[name] = "hung (120 s)"
            break
        outcomes[name] = "ok" if done.returncode == 0 else f"exit {done.returncode}"
        if done.returncode:
            failures.append(f"----- {name}\n{done.stdout[-1500:]}{done.stderr[-2500:]}")
            if "in open_package" in done.stderr:  # the H200 runs: each died alike in the loader (faulthandler's stack)
                outcomes["the rest"] = "not run: it died in AOTInductor's loader, as the rest would"
                break
        elif name.startswith("bench"):
            lines = done.stdout.splitlines()
            report = json.loads("\n".join(lines[lines.index("{"):]))
            result = report["results"]["aoti"]
            assert result["cuda_graphs"] == (not name.endswith("--no-cuda-graphs")), name
            assert result["decode_tokens_per_s"] > 0 and report["isolated"] == ("--in-process" not in name), name
    assert set(outcomes.values()) == {"ok"}, f"{outcomes}\n" + "\n".join(failures)


def texts_generated_alone(path: Path, asks: list[tuple[list[int], int]]) -> list[str]:
    """Each (prompt, max tokens)'s greedy text from the aoti runtime alone (serve_process.reference_text),
    computed in a process of its own: a fresh-process test must not load a package in pytest's process
    (where a fresh process cannot load one, it would die, and the run's report with it)."""
    code = ("import json, sys\nimport dbrx_aot\nfrom serve_process import reference_text\n"
            "rt = dbrx_aot.load_runtime(sys.argv[1], 'aoti', device='cuda', progress=False)\n"
            "print(json.dumps([reference_text(rt, p, n) for p, n in json.loads(sys.argv[2])]))\n")
    done = subprocess.run([sys.executable, "-X", "faulthandler", "-c", code, str(path), json.dumps(asks)],
                          capture_output=True, text=True, timeout=180, cwd=Path(__file__).parent)
    assert done.returncode == 0, f"generate alone: exit {done.returncode}\n{done.stderr[-3000:]}"
    return json.loads(done.stdout.splitlines()[-1])


@pytest.mark.fresh_process
def test_server_on_cuda_answers_each_request_as_generate_does_alone(cuda_artifact, tmp_path):
    """`dbrx-aot serve --device cuda`: the scheduler's thread runs the aoti package (its decode CUDA
    graph captured there) while uvicorn's thread answers HTTP; 2 x B greedy requests at once (one
    streamed) each get the text `generate` gives its prompt alone, and SIGTERM ends it with 0."""
    for module in ("fastapi", "uvicorn", "prometheus_client"):
        try:
            __import__(module)
        except Exception as err:  # the GPU image has none of the serving stack unless carried (make gpu-wheels)
            pytest.skip(f"{module} cannot be imported ({type(err).__name__}: {err}); dbrx-aot serve needs it")
    from concurrent.futures import ThreadPoolExecutor

    from serve_process import Server, next_event, open_stream, request

    B = ARTIFACT_SHAPES["batch_size"]
    prompts = [prompt(5 + 3 * n, seed=20 + n) for n in range(2 * B)]
    expected = texts_generated_alone(cuda_artifact("float32"), [(p, 6 + n) for n, p in enumerate(prompts)])
    srv = Server(cuda_artifact("float32"), tmp_path / "server.log", "--device", "cuda", "--max-queue", "8",
                 start_s=120)
    try:
        status, body, _ = request(srv.port, "GET", "/health")
        assert status == 200 and json.loads(body)["device"].startswith("cuda"), body

        def ask(n: int) -> str:
            req = {"prompt": prompts[n], "max_tokens": 6 + n, "temperature": 0}
            if n == 0:
                conn, resp = open_stream(srv.port, "/v1/completions", req)
                text = ""
                while (event := next_event(resp)) not in (None, "[DONE]"):
                    text += event["choices"][0]["text"] if event["choices"] else ""
                conn.close()
                return text
            status, body, _ = request(srv.port, "POST", "/v1/completions", json.dumps(req))
            assert status == 200, body
            return json.loads(body)["choices"][0]["text"]

        with ThreadPoolExecutor(2 * B) as pool:
            assert list(pool.map(ask, range(2 * B), timeout=120)) == expected
    finally:
        code = srv.terminate()
    assert code == 0, srv.log.read_text()[-3000:]


def onnxruntime_cuda_missing() -> str | None:
    try:
        import onnxruntime
    except ImportError:
        return "onnxruntime is not installed"
    providers = onnxruntime.get_available_providers()
    if "CUDAExecutionProvider" not in providers:
        return (f"onnxruntime {onnxruntime.__version__} has no CUDAExecutionProvider (has {', '.join(providers)}); "
                "onnxruntime-gpu is needed")
    return None


def test_onnxruntime_cuda_provider_matches_eager(tiny_checkpoint, tmp_path_factory, fp32_pair):
    reason = onnxruntime_cuda_missing()
    if reason:
        pytest.skip(reason)
    from dbrx_aot.export import export_artifact

    path = export_artifact(tiny_checkpoint, tmp_path_factory.mktemp("onnx-cuda") / "art", formats="onnx",
                           progress=False, **ARTIFACT_SHAPES).path
    ort = dbrx_aot.load_runtime(path, "onnxruntime", device="cuda", progress=False)
    eager = dbrx_aot.load_runtime(path, "eager", device="cuda", dtype="float32", progress=False)
    assert ort.providers[0] == "CUDAExecutionProvider"
    check_prefill_and_decode(ort, eager, atol=TOLERANCE[("onnxruntime", torch.float32)])
    check_two_caches(ort)
