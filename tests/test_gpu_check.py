"""The GPU check (scripts/gpu_check.py): its CPU dry run, so that the script cannot rot between
the rare sessions that have a GPU, and the pieces that decide what its summary says."""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import fcntl
import json
import re
import sys
import time
from pathlib import Path

import pytest

from conftest import load_script
from dbrx_aot.config import PRESETS

gpu_check = load_script("gpu_check")
load_probe = load_script("aoti_load_probe")


def failed_commands(log: str) -> list[str]:
    """The blocks of the check's log.txt ("===== label: command", its output, "===== exit N") whose
    command exited non-zero."""
    blocks = re.finditer(r"^===== [^\n]*\n.*?^===== exit (-?\d+) after [\d.]+ s$", log, re.M | re.S)
    return [b[0] for b in blocks if b[1] != "0"]


def test_make_gpu_check_dry_run_on_cpu(gpu_check_dry_run):
    """`make gpu-check DEVICE=cpu`: every stage at tiny sizes, the summary written in full."""
    proc, out = gpu_check_dry_run.proc, gpu_check_dry_run.out
    summary = json.loads((out / "summary.json").read_text())
    failed = [s for s in summary["stages"] if not s["ok"]]
    if proc.returncode or failed:  # in full (pytest shortens an assert's tuple): the stages, the failed commands
        print(*(f"{s['name']}: {s['detail']}" for s in failed), *failed_commands((out / "log.txt").read_text()),
              proc.stdout[-3000:], proc.stderr[-3000:], sep="\n")
    assert proc.returncode == 0 and not failed, [s["name"] for s in failed]
    debugged = ["load probe under the debugger"] if summary["environment"]["debugger"] else []
    assert [s["name"] for s in summary["stages"]] == ["environment", "install", "imports", "tests", "load probe",
                                                       "exports", "slice", "bench", "fresh-process tests", *debugged]
    assert sorted(p.name for p in out.iterdir()) == ["log.txt", "pytest-fresh-process.xml", "pytest-other-files.xml",
                                                     "pytest.xml", "summary.json", "summary.md"]
    # pytest -m gpu ran every GPU test, and each was skipped for want of a device.
    names = {t["name"] for t in summary["tests"]}
    assert "test_gpu::test_cuda_graphs_on_and_off_are_bit_identical[bfloat16-triton]" in names and len(names) >= 8
    assert all(t["outcome"] == "skipped" and "no CUDA device" in t["message"] for t in summary["tests"])
    # The load probe: decode.pt2 loaded by a fresh process, plainly (after the libstdc++ report) and each way round.
    probe = summary["figures"]["load_probe"]
    assert {"decode.pt2", *(name for name, _, _ in gpu_check.LOAD_WORKAROUNDS)} <= set(probe)
    assert all(re.fullmatch(r"ok: loaded: \d+ constants at [\d.]+ s", line)
               for name, line in probe.items() if " under " not in name), probe
    if summary["environment"]["debugger"]:
        assert probe[f"decode.pt2 under {Path(summary['environment']['debugger']).name}"].startswith("passed")
    libraries = summary["figures"]["libstdcxx"]
    assert len(libraries) == len(load_probe.STD_SYMBOLS) + 5 and "the package's .so: " in libraries[-4], libraries
    # export.aoti: the .so exports the C API alone, and its libstdc++ is linked in (no C++ imported).
    assert " 0 of them beyond AOTInductor's C API (0 GNU-unique" in libraries[-4], libraries[-4]
    assert "; 0 C++ symbols imported; needs " in libraries[-4] and "libstdc++" not in libraries[-4], libraries[-4]
    # The dynamic linker's bindings of the .so (LD_DEBUG): to torch's C shim, libc; none of std::regex's outside it.
    bindings, std_elsewhere, last = libraries[-3:]
    assert re.match(r"the \.so's bindings outside it \(LD_DEBUG\): \d+: .*libtorch_cpu\.so \d+", bindings), bindings
    assert std_elsewhere.startswith("its C++ standard library symbols bound elsewhere than libstdc++: ")
    assert "regex" not in std_elsewhere and last.startswith("its last bindings: "), (std_elsewhere, last)
    assert not (gpu_check_dry_run.work / "ld-bindings").exists()  # 200 MB of log, read and removed
    assert "libstdc++ in the process that loads decode.pt2" in (out / "summary.md").read_text()
    assert re.search(r"^C\+\+: packages compiled by .+; torch built with GCC", (out / "summary.md").read_text(), re.M)
    assert "## Load probe" in (out / "summary.md").read_text()
    bench = summary["figures"]["bench"]
    assert set(bench["runs"]) == {"eager", "aoti", "aoti_no_cuda_graphs"}
    assert all(r["decode_tokens_per_s"] > 0 and r["cuda_graphs"] is False for r in bench["runs"].values())
    one = summary["figures"]["slice"]["batch1"]
    assert one["decode_moe"] == "gather" and 0 < one["fraction_of_bandwidth_limit"] and one["prefill_tokens_per_s"] > 0
    assert one["decode_ms_per_layer"] == one["decode_ms_p50"]  # the CPU slice has 1 layer
    assert one["decode_profile"]["rows"] and "## A slice decode step's kernels" in (out / "summary.md").read_text()
    assert [t["met"] for t in summary["targets"]] == [None] * 4  # GPU targets are not judged on CPU
    md = (out / "summary.md").read_text()
    assert "CPU dry run" in md and "## Real-width slice: small, 1 layers" in md and "| slice | ok |" in md
    assert "===== slice batch1:" in (out / "log.txt").read_text()
    int8 = summary["figures"]["slice"]["batch1-int8"]  # issue 10: int8 beside the plan's dtype at real width
    assert int8["weights"] == "int8" and int8["decode_bytes_per_step"] < 0.6 * one["decode_bytes_per_step"]
    assert "| 1 | int8 | auto |" in md
    sdpa = summary["figures"]["slice"]["batch1-sdpa"]  # issue 13: sdpa beside the written-out attention
    assert sdpa["attention"] == "sdpa" and sdpa["prefill_tokens_per_s"] > 0 and "| 1 | same | sdpa |" in md
    grouped = summary["figures"]["slice"]["batch1-grouped"]  # issue 13: grouped prefill experts
    assert grouped["moe"] == "grouped" and grouped["prefill_tokens_per_s"] > 0 and "| grouped / grouped |" in md


def make_check(tmp_path, device="cpu"):
    args = argparse.Namespace(device=device, out=str(tmp_path / "out"), work=str(tmp_path / "work"), deadline=60,
                              skip_install=True, stages="tests,bench,slice", reuse_exports=False, compile_here=False)
    return gpu_check.Check(args)


def test_a_failing_stage_is_recorded_and_the_next_still_runs(tmp_path):
    check = make_check(tmp_path)

    def broken():
        raise gpu_check.StageFailed("exit 1: compile error")

    def buggy():
        return {}["missing"]

    check.stage("first", broken)
    check.stage("second", buggy)
    check.stage("third", lambda: "fine")
    assert [(s["name"], s["ok"], s["detail"]) for s in check.stages] == [
        ("first", False, "exit 1: compile error"), ("second", False, "KeyError: 'missing'"), ("third", True, "fine")]


def test_a_command_past_the_deadline_is_killed(tmp_path):
    check = make_check(tmp_path)
    check.deadline = check.start + 1.5
    rc, out = check.run("sleeper", [sys.executable, "-c", "import time; time.sleep(30)"], timeout=60)
    assert rc == -9 and "killed after" in out


def test_a_pytest_run_past_its_time_is_interrupted_and_reports_the_tests_that_ran(tmp_path):
    """Killed, pytest writes no report: the tests that passed before the deadline would be lost. Its
    end is its own, not the end of its output: a process it started (a compile worker) may hold that
    open (here a `sleep`)."""
    check = make_check(tmp_path)
    (tmp_path / "pytest.ini").write_text("[pytest]\n")
    (tmp_path / "test_slow.py").write_text("import subprocess, time\n\ndef test_quick():\n    pass\n\n"
                                           "def test_slow():\n    subprocess.Popen(['sleep', '60'])\n"
                                           "    time.sleep(120)\n")
    xml = tmp_path / "r.xml"
    started = time.monotonic()
    rc, out = check.run("tests", [sys.executable, "-m", "pytest", "-q", "-s", "-p", "no:cacheprovider", "-c",
                                  str(tmp_path / "pytest.ini"), f"--junitxml={xml}", str(tmp_path / "test_slow.py")],
                        timeout=10, interrupt_s=8)
    assert "interrupted after 10 s" in out and rc == 2 and time.monotonic() - started < 25, out  # 2: interrupted
    assert [(t["name"], t["outcome"]) for t in gpu_check.read_junit(xml)] == [("test_slow::test_quick", "passed")]

    def the_same_run(label, cmd, timeout, env=None, interrupt_s=0):  # as the tests stage's
        (check.out / "t.xml").write_bytes(xml.read_bytes())
        return rc, out

    check.run = the_same_run
    with pytest.raises(gpu_check.StageFailed, match=r"^1 passed; tests/test_gpu.py: pytest interrupted after 10 s, "
                                                    r"the rest did not run$"):
        check.tests_stage(parts={"t.xml": ["tests/test_gpu.py"]})
    check.run = lambda label, cmd, timeout, env=None, interrupt_s=0: (1, "ImportError: no module named x")
    with pytest.raises(gpu_check.StageFailed, match="pytest wrote no report"):  # the earlier run's is not read
        check.tests_stage(parts={"t.xml": ["tests/test_gpu.py"]})


def test_a_crashed_command_prints_its_stack_and_is_summed_up_by_the_line_that_says_why(tmp_path):
    """The first H200 run's failures read "warnings.warn(...)" and "|   ^~~~": the lines after the error."""
    check = make_check(tmp_path)
    rc, out = check.run("crash", [sys.executable, "-c", "import os; os.abort()"], timeout=60)
    assert rc == -6 and "Fatal Python error: Aborted" in out  # PYTHONFAULTHANDLER: the stack is in the log
    cli = ("Fatal Python error: Segmentation fault\n  File \"runtimes/aoti.py\", line 95 in run_graph\n"
           "error: the aoti runtime: its process died of SIGSEGV before it reported\n"
           "resource_tracker.py:254: UserWarning: resource_tracker: There appear to be 1 leaked semaphore objects\n"
           "  warnings.warn('resource_tracker: There appear to be %d '\n")
    assert gpu_check.last_line(cli) == "error: the aoti runtime: its process died of SIGSEGV before it reported"
    cpp = ("Traceback (most recent call last):\n  File \"x.py\", line 1\n"
           "torch._inductor.exc.InductorError: CppCompileError: C++ compile error\n\nCommand:\ng++ w.cpp\n\nOutput:\n"
           "w.cpp:3807:33: error: 'aoti_torch_cuda__grouped_mm' was not declared in this scope\n"
           " 3807 |     AOTI_TORCH_ERROR_CODE_CHECK(aoti_torch_cuda__grouped_mm(buf39));\n      |        ^~~~\n")
    assert gpu_check.last_line(cpp) == "error: 'aoti_torch_cuda__grouped_mm' was not declared in this scope"
    assert gpu_check.last_line(cpp.split("\n\nCommand")[0]) == \
        "torch._inductor.exc.InductorError: CppCompileError: C++ compile error"
    assert gpu_check.last_line("a\n\nlast words\n") == "last words" and gpu_check.last_line("") == "(no output)"


def test_a_wheel_already_installed_at_its_version_or_newer_is_not_installed(tmp_path):
    import importlib.metadata

    have = importlib.metadata.version("click")
    assert gpu_check.wheel_installed(tmp_path / f"click-{have}-py3-none-any.whl")
    assert gpu_check.wheel_installed(tmp_path / "click-0.0.1-py3-none-any.whl")
    assert not gpu_check.wheel_installed(tmp_path / "click-999.0-py3-none-any.whl")
    assert not gpu_check.wheel_installed(tmp_path / "no_such_dist-1.0-py3-none-any.whl")


def test_junit_outcomes(tmp_path):
    xml = tmp_path / "r.xml"
    xml.write_text("""<testsuites><testsuite>
      <testcase classname="tests.test_gpu" name="test_a" time="1.5"/>
      <testcase classname="tests.test_gpu" name="test_b" time="0.1"><failure message="assert 1 == 2">tb</failure></testcase>
      <testcase classname="tests.test_gpu" name="test_c" time="0"><skipped message="no CUDA device"/></testcase>
      <testcase classname="tests.test_gpu" name="test_d" time="0"><error message="fixture broke">tb</error></testcase>
    </testsuite></testsuites>""")
    assert [(t["name"], t["outcome"], t["message"]) for t in gpu_check.read_junit(xml)] == [
        ("test_gpu::test_a", "passed", ""), ("test_gpu::test_b", "failed", "assert 1 == 2"),
        ("test_gpu::test_c", "skipped", "no CUDA device"), ("test_gpu::test_d", "error", "fixture broke")]


def test_the_fresh_process_tests_load_the_artifacts_the_first_pytest_run_compiled(tmp_path):
    """Every pytest run names one folder for the GPU tests' CUDA artifacts (tests/test_gpu.py's
    cuda_artifact keeps them there), so the last, the fresh-process tests', compiles nothing."""
    check, envs = make_check(tmp_path, "cuda"), []

    def fake_run(label, cmd, timeout, env=None, stoppable=False, interrupt_s=0):
        envs.append(env)
        xml = Path(next(arg for arg in cmd if arg.startswith("--junitxml=")).split("=", 1)[1])
        xml.write_text(f'<testsuite><testcase classname="tests.test_gpu" name="{xml.stem}" time="1"/></testsuite>')
        return 0, ""

    check.run = fake_run
    assert check.tests_stage() == "2 passed"  # test_gpu.py, and the other files beside it
    assert check.tests_stage("gpu and fresh_process", gpu_check.FRESH_PROCESS_PARTS) == "1 passed"
    assert envs[0] == envs[1] == envs[2] == {gpu_check.TEST_ARTIFACTS_ENV: str(check.work / "test-artifacts")}


def test_targets_are_judged_on_cuda_only(tmp_path):
    check = make_check(tmp_path, device="cuda")
    check.figures = {"bench": {"cuda_graphs_speedup": 1.5, "aoti_vs_eager": 1.9},
                     "slice": {"batch1": {"fraction_of_bandwidth_limit": 0.45},
                               "batch1-triton": {"fraction_of_bandwidth_limit": 0.72}}}
    assert [(t["value"], t["met"]) for t in check.summary()["targets"]] == [(0.45, False), (0.72, True), (1.5, True),
                                                                            (1.9, False)]
    check.figures = {}
    assert [t["met"] for t in check.summary()["targets"]] == [None, None, None, None]
    md = gpu_check.format_summary(check.summary())
    assert "not measured (goal 0.7): no figure" in md


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_export_jobs_build_what_the_benches_read(tmp_path, device):
    check = make_check(tmp_path, device)
    jobs = check.export_jobs()
    plan = gpu_check.PLANS[device]
    kernels = ["triton"] if device == "cuda" else []  # the Triton gather kernels compile for CUDA only
    B = plan.slice_batches[0]
    assert list(jobs) == (["bench artifact", f"slice batch{B}"] + [f"slice batch{B}-{k}" for k in kernels]
                          + [f"slice batch{b}" for b in plan.slice_batches[1:]]
                          + [f"slice batch{B}-{v}" for v in ("int8", "sdpa", "grouped")])
    flat = [" ".join(cmd) for _, cmds in jobs.values() for cmd in cmds]
    assert [c for c in flat if "--moe-kernel triton" in c] == [c for c in flat if "slice-batch1-triton " in c]
    assert len([c for c in flat if "--moe-kernel triton" in c]) == len(kernels)
    assert all("--device " + device in c for c in flat if " export " in c)
    assert any(f"--preset {plan.slice_preset} --layers {plan.slice_layers} --skip-weights" in c for c in flat)


def test_a_rerun_of_one_stage_exports_only_what_it_needs(tmp_path):
    check = make_check(tmp_path, "cuda")
    check.stages_chosen = {"slice"}
    assert list(check.export_jobs()) == ["slice batch1", "slice batch1-triton", "slice batch8", "slice batch1-int8",
                                         "slice batch1-sdpa", "slice batch1-grouped"]
    check.stages_chosen = {"tests"}
    assert check.export_jobs() == {}
    check.stages_chosen = {"probe"}  # it loads the bench artifact's decode.pt2
    assert list(check.export_jobs()) == ["bench artifact"]
    check.reuse_exports = True
    artifact = tmp_path / "art"
    artifact.mkdir()
    (artifact / "manifest.json").write_text("{}")
    assert check.run_job("x", artifact, [["false"]]) == (True, 0.0, "reused")
    check.reuse_exports = False
    ok, _, why = check.run_job("x", artifact, [["false"]])
    assert not ok and why.startswith("exit 1")


def test_a_failed_bench_run_keeps_the_other_runs_figures(tmp_path):
    """A CUDA graph capture that fails on its first GPU must not cost the eager and no-graph figures."""
    check = make_check(tmp_path, "cuda")
    run = {"prefill_tokens_per_s": 100.0, "decode_tokens_per_s": 50.0, "decode_ms_p50": 20.0, "decode_ms_p90": 21.0,
           "decode_ms_per_layer": 5.0, "decode_bytes_per_step": 10**9, "decode_bandwidth_gb_s": 50.0,
           "fraction_of_bandwidth_limit": 0.02, "decode_moe": "gather", "cuda_graphs": False}
    calls = []

    def fake_bench(label, path, *options):
        calls.append(options)
        if "--no-cuda-graphs" not in options and "aoti" in options:
            raise gpu_check.StageFailed(f"{label}: exit 1: operation not permitted when stream is capturing")
        name = "eager" if "eager" in options else "aoti"
        return {"copy_bandwidth_gb_s": 3000.0, "results": {name: run}}

    check.bench = fake_bench
    check.stage("bench", check.bench_stage)
    assert not check.stages[0]["ok"] and "stream is capturing" in check.stages[0]["detail"]
    assert set(check.figures["bench"]["runs"]) == {"eager", "aoti_no_cuda_graphs"} and len(calls) == 3
    check.stage("slice", check.slice_stage)  # each batch retried without CUDA graphs, and measured
    assert {k for k in check.figures["slice"] if k.startswith("batch")} == {"batch1", "batch8", "batch1-triton",
                                                                              "batch1-int8", "batch1-sdpa",
                                                                              "batch1-grouped"}
    assert check.figures["slice"]["batch1-triton"]["moe_kernel"] == "triton"
    md = gpu_check.format_summary(check.summary())
    assert "| eager | off | 100 | 50.0 |" in md and "aoti vs eager decode: -x" in md


def test_when_every_aoti_bench_fails_verify_says_whether_the_package_runs_in_a_plain_process(tmp_path):
    check = make_check(tmp_path, "cuda")
    commands = []

    def fake_bench(label, path, *options):
        if "aoti" in options:
            raise gpu_check.StageFailed(f"{label}: exit 2: error: the aoti runtime: its process died of SIGSEGV")
        return {"copy_bandwidth_gb_s": 3000.0, "results": {"eager": {"decode_tokens_per_s": 50.0}}}

    def fake_run(label, cmd, timeout, env=None):
        commands.append(cmd)
        assert env["AOTI_RUNTIME_CHECK_INPUTS"] == "1" and env["CUDA_LAUNCH_BLOCKING"] == "1"
        return 0, "aoti  1.0e-02 ... ok"

    check.bench, check.run = fake_bench, fake_run
    check.stage("bench", check.bench_stage)
    assert [c[c.index("verify"):] for c in commands] == [
        ["verify", str(check.work / "bench-art"), "--runtime", "aoti", "--device", "cuda", "--steps", "8"]]
    assert check.stages[0]["detail"].endswith("died of SIGSEGV; verify aoti: passed")


def test_slice_exports_on_cuda_take_turns_by_the_gpus_memory(tmp_path):
    """On CUDA a slice export holds its weights on the GPU while it compiles (15.5 GB for 2 layers of
    the released model in bf16): as many at once as fit in 80% of the GPU's memory."""
    check = make_check(tmp_path, "cuda")
    runs = len(gpu_check.slice_runs(check.plan))
    assert check.slice_exports_at_once() == runs  # no device read yet: all at once
    check.environment["device_memory_gb"] = 85.0   # H100 80 GB: 68 GB for 15.5 GB exports
    assert check.slice_exports_at_once() == 4 < runs
    check.environment["device_memory_gb"] = 150.8  # H200
    assert check.slice_exports_at_once() == runs
    check.environment["device_memory_gb"] = 8.0
    assert check.slice_exports_at_once() == 1
    cpu = make_check(tmp_path, "cpu")
    assert cpu.slice_exports_at_once() == len(gpu_check.slice_runs(cpu.plan))
    for plan in gpu_check.PLANS.values():  # the plans' weight sizes are the presets' (bf16)
        config = dataclasses.replace(PRESETS[plan.slice_preset], n_layers=plan.slice_layers)
        assert plan.dtype == "bfloat16" and plan.slice_weight_gb == pytest.approx(config.param_count() * 2 / 1e9, rel=1e-3)


def test_a_bench_whose_measuring_process_dies_is_measured_again_in_the_clis_process(tmp_path):
    """The first H200 run: every aoti bench's spawned measuring process died. Once one does, that bench
    runs again with --in-process, and so does every later bench; the summary says so."""
    check = make_check(tmp_path, "cuda")
    report = {"copy_bandwidth_gb_s": 3000.0, "results": {"aoti": {"decode_tokens_per_s": 80.0}}}
    commands = []

    def fake_run(label, cmd, timeout, env=None):
        commands.append((label, cmd[cmd.index("bench"):]))
        if "--in-process" in cmd:
            return 0, "progress\n" + json.dumps(report, indent=2)
        return 2, "Fatal Python error: Segmentation fault\nerror: the aoti runtime: its process died of SIGSEGV"

    check.run = fake_run
    assert check.bench("bench eager", tmp_path, "--runtime", "eager") == report
    assert check.bench("bench aoti", tmp_path, "--runtime", "aoti") == report
    assert [(label, cmd[-1]) for label, cmd in commands] == [
        ("bench eager", "eager"), ("bench eager --in-process", "--in-process"), ("bench aoti", "--in-process")]
    assert check.figures["in_process"].startswith("from bench eager on, measured in the CLI's own process")
    assert "died of SIGSEGV); in the CLI's process it ran" in check.figures["in_process"]
    check.figures["bench"] = {"preset": "small", "dtype": "bfloat16", "prompt_len": 1, "new_tokens": 1,
                              "copy_bandwidth_gb_s": 3000.0, "runs": {}}
    assert "Note: from bench eager on, measured in the CLI's own process" in gpu_check.format_summary(check.summary())
    # Dying there too is one failure that says both.
    again = make_check(tmp_path, "cuda")
    again.run = lambda label, cmd, timeout, env=None: (-11, "error: the aoti runtime: its process died of SIGSEGV")
    with pytest.raises(gpu_check.StageFailed, match=r"bench aoti: error: .*died of SIGSEGV; --in-process: exit -11"):
        again.bench("bench aoti", tmp_path, "--runtime", "aoti")


@pytest.mark.skipif(gpu_check.debugger() is None, reason="no gdb or cuda-gdb here")
def test_the_debugger_names_the_native_frames_of_a_crash(tmp_path):
    """Where a package crashes in compiled code, the Python stack ends at the call into it; the
    debugger's says where inside (the GPU image has cuda-gdb)."""
    check = make_check(tmp_path)
    check.environment_stage()
    tool = check.environment["debugger"]
    if tool is None:  # a sandbox without ptrace: the check then runs the diagnosis without a debugger
        pytest.skip(f"the debugger cannot run programs here: {check.environment['debugger_refused']}")

    def outcome(code: str) -> str:  # through Check.run, as the diagnosis runs it
        rc, out = check.run("debugged", gpu_check.under_debugger(tool, [sys.executable, "-c", code]), 120)
        return gpu_check.debugged_outcome(out, rc)

    crash = outcome("import ctypes; ctypes.string_at(0)")
    assert re.fullmatch(r"died of SIGSEGV in \S+ \(.+\)( < .+)+", crash) and "string_at (_ctypes.c:" in crash
    assert outcome("import sys; sys.exit('error: no such file')") == "exit 1: error: no such file"
    assert outcome("print('fine')") == "passed"


def test_the_load_probe_says_how_each_load_ended_and_where_it_stopped():
    """A probe's line: its steps' times when it loaded; how it ended and its last step when it did
    not; under the debugger, the native frames of its own SIGTRAP (where a slow load spends its
    time) and of the crash after it."""
    steps = "probe     2.0 s: torch 2.11.0+cu130 imported\nprobe     2.1 s: warm-up none done\n"
    steps += "probe    41.9 s: libstdc++: _ZNSt6locale7classicEv: not in the global scope\n"
    loaded = steps + "probe    43.5 s: loaded: 4 constants\nprobe    43.6 s: ran: matches eager\n"
    assert gpu_check.probe_outcome(loaded, 0, 44.0) == "ok: loaded: 4 constants at 43.5 s; ran: matches eager at 43.6 s"
    assert gpu_check.probe_outcome(steps + "Fatal Python error: Segmentation fault\n", -11, 47.2) == (
        "died of SIGSEGV 47 s into the command (last step: warm-up none done at 2.1 s)")
    assert gpu_check.probe_outcome("(killed after 240 s)", -9, 240.0).startswith("killed at its time limit 240 s")
    debugged = (steps + 'Thread 1 "python3" received signal SIGTRAP, Trace/breakpoint trap.\n'
                "#0  0x00007f in __GI___poll (fds=0x1) at ../sysdeps/poll.c:29\n"
                "#1  0x00007f in torch::inductor::AOTIModelPackageLoader::AOTIModelPackageLoader () "
                "from /x/libtorch_cpu.so\n"
                'Thread 1 "python3" received signal SIGSEGV, Segmentation fault.\n'
                "#0  0x00007f in AOTInductorModelContainerCreateWithDevice () from /tmp/abc/model.wrapper.so\n")
    assert gpu_check.debugged_probe(debugged, 0) == (
        "stopped by the probe's SIGTRAP in __GI___poll (poll.c:29) < "
        "torch::inductor::AOTIModelPackageLoader::AOTIModelPackageLoader (libtorch_cpu.so); "
        "then died of SIGSEGV in AOTInductorModelContainerCreateWithDevice (model.wrapper.so)")
    # The third H200 run's crash (abridged): C++ names without their template arguments, parameters
    # and return types; a recursion's frames counted; AOTInductor's hash-named .so as wrapper.so.
    so = "from /tmp/m8/decode/data/aotinductor/model/ciexgb53tpzasbjwwt7qfxq2mjmra7abbwztydt4rfwvs5e2isyb.wrapper.so"
    frames = ["std::codecvt<char16_t, char, __mbstate_t>::do_unshift(__mbstate_t&, char*, char*, char*&) const ()",
              "std::__cxx11::basic_string<char, std::char_traits<char>, std::allocator<char> > "
              "std::__cxx11::regex_traits<char>::transform_primary<char const*>(char const*, char const*) const ()",
              *["std::__detail::_Compiler<std::__cxx11::regex_traits<char> >::_M_atom() ()",
                "std::__detail::_Compiler<std::__cxx11::regex_traits<char> >::_M_disjunction() ()"] * 2,
              "torch::aot_inductor::parse_device_str(std::__cxx11::basic_string<char, std::char_traits<char>, "
              "std::allocator<char> > const&, int&, int&) ()"]
    crash = ('Thread 1 "python3" received signal SIGSEGV, Segmentation fault.\n'
             + "".join(f"#{i}  0x00007fff172ca2e4 in {frame} {so}\n" for i, frame in enumerate(frames))
             + "#6  <signal handler called>\n")
    assert gpu_check.debugged_stops(crash) == [
        "SIGSEGV in std::codecvt<>::do_unshift (wrapper.so) < std::__cxx11::regex_traits<>::transform_primary<> "
        "(wrapper.so) < std::__detail::_Compiler<>::_M_atom (wrapper.so) x2 < "
        "std::__detail::_Compiler<>::_M_disjunction (wrapper.so) x2 < torch::aot_inductor::parse_device_str "
        "(wrapper.so) < <signal handler called>"]
    exited = steps + "[Inferior 1 (process 7) exited normally]\n"
    assert gpu_check.debugged_probe(exited, 0) == "passed: exited normally"
    assert gpu_check.under_debugger("gdb", ["x"], stops=2)[-6:] == ["-ex", "continue", "-ex", "bt 30", "--args", "x"]


def test_the_ld_debug_log_says_which_of_other_libraries_symbols_the_so_ran(tmp_path):
    """so_bindings over LD_DEBUG=bindings logs (one per process): the .so's bindings outside itself per
    library, the C++ standard library's that went elsewhere than libstdc++ (std::regex's first), and
    the last ones; lines of other objects and the .so's bindings to itself are not its; the log is
    removed once read."""
    so = "/tmp/x/model/abc.wrapper.so"

    def bound(target: str, symbol: str, who: str = so) -> str:
        return f"     7:\tbinding file {who} [0] to {target} [0]: normal symbol `{symbol}' [GLIBCXX_3.4]\n"

    logs = tmp_path / "ld-bindings"
    logs.mkdir()
    (logs / "load.7").write_text(
        bound(so, "_ZTSSt11_Mutex_baseILN9__gnu_cxx12_Lock_policyE2EE")  # its own
        + bound("/usr/lib/libstdc++.so.6", "_ZNSt6localeC1Ev")
        + bound("/v/torch/lib/libtorch_cpu.so", "_ZNSt7__cxx1112basic_stringIcSt11char_traitsIcESaIcEE10_M_disposeEv")
        + bound("/v/torch/lib/libtorch_python.so",
                "_ZZNKSt7__cxx1112regex_traitsIcE16lookup_classnameIPKcEENS1_10_RegexMaskET_S6_bE12__classnames")
        + bound("/usr/lib/libc.so.6", "malloc", who="/v/torch/lib/libtorch_cpu.so")  # not the .so's
        + bound("/usr/lib/libc.so.6", "pthread_rwlock_wrlock"))
    (logs / "load.8").write_text(bound("/usr/lib/libc.so.6", "free", who="/usr/bin/python3"))  # a python it started
    counts, elsewhere, last = gpu_check.so_bindings(logs)
    assert counts == ("the .so's bindings outside it (LD_DEBUG): 4: libstdc++.so.6 1, libtorch_cpu.so 1, "
                      "libtorch_python.so 1, libc.so.6 1")
    assert elsewhere.startswith("its C++ standard library symbols bound elsewhere than libstdc++: 2 "
                                "(libtorch_cpu.so 1, libtorch_python.so 1): "), elsewhere
    assert "regex_traits" in elsewhere and elsewhere.index("-> libtorch_python.so") < elsewhere.index("basic_string")
    assert last.startswith("its last bindings: ") and last.endswith("; pthread_rwlock_wrlock -> libc.so.6"), last
    assert not logs.exists()
    logs.mkdir()
    assert gpu_check.so_bindings(logs) == ["the .so's bindings outside it (LD_DEBUG): none logged"]


def test_where_a_fresh_process_cannot_load_a_package_the_aoti_commands_go_the_way_that_let_one(tmp_path):
    """The H200 runs: every fresh load of a CUDA package died in AOTInductor's loader. Where the load
    probe finds a way that loads (a warm-up, an environment), the benches and the diagnosis go
    through it, in the CLI's own process; where none does, each aoti bench compiles its artifact
    again in its own process and measures there, the slices side by side, measured one at a time."""
    died = "died of SIGSEGV 47 s into the command (last step: warm-up none done at 2.1 s)"
    deepbind, preload, c_locale, own = (name for name, _, _ in gpu_check.LOAD_WORKAROUNDS)
    outcomes = {"decode.pt2": died, deepbind: died, preload: died, c_locale: died,
                own: "ok: loaded: 19 constants at 60.0 s"}
    run = {"prefill_tokens_per_s": 100.0, "decode_tokens_per_s": 80.0, "decode_ms_p50": 12.5, "decode_ms_p90": 13.0,
           "fraction_of_bandwidth_limit": 0.05, "cuda_graphs": True, "decode_ms_per_layer": 1.0,
           "decode_bytes_per_step": 2e9, "decode_moe": "gather", "decode_bandwidth_gb_s": 160.0}

    def checked(outcomes: dict) -> tuple:
        check, commands = make_check(tmp_path, "cuda"), []

        def fake_run(label, cmd, timeout, env=None, stoppable=False):  # a report for each bench among its CLI commands
            commands.append((cmd, env))
            reports = [{"copy_bandwidth_gb_s": 3000.0, "results": {"aoti" if "aoti" in c else "eager": run}}
                       for c in " ".join(cmd).split(" -- ") if " bench " in f" {c} "]
            return 0, "".join("warm-up chatter\n" + json.dumps(r, indent=2) + "\n" for r in reports)

        check.run = fake_run
        check.jobs = check.export_jobs()
        probe = concurrent.futures.Future()
        probe.set_result(outcomes)
        check.decide_loading(outcomes)  # load_probe's last step
        check.stage("load probe", check.load_probe_stage, probe)
        assert not check.stages[0]["ok"] and check.fresh_load_fails == died and check.loading_decided.is_set()
        return check, commands

    check, commands = checked(outcomes)
    assert check.workaround[:2] == (own, "aoti-compile-load")
    # The exports a fresh process would load still run (the slices', the diagnosis's graphs).
    assert check.run_job("slice batch1", check.work / "slice-batch1", [["true"]]) == (True, pytest.approx(0, abs=1),
                                                                                        "ok")
    check.stage("bench", check.bench_stage)
    assert check.stages[-1]["ok"], check.stages[-1]
    through = [str(gpu_check.PROBE), "run", "--device", "cuda", "--warm", "aoti-compile-load", "--", "--quiet", "bench"]
    aoti = [cmd for cmd, _ in commands if "aoti" in cmd]
    assert len(aoti) == 2 and all(c[1:10] == through and c[-1] == "--in-process" for c in aoti)
    assert [cmd[1:3] for cmd, _ in commands if "eager" in cmd] == [["-m", "dbrx_aot.cli"]]
    assert (f"the aoti commands ran in the CLI's own process the way that let one: {own}"
            in gpu_check.format_summary(check.summary()))
    # The deepbind way's environment travels with it, to the diagnosis too.
    check.workaround = gpu_check.LOAD_WORKAROUNDS[0]
    check.environment["debugger"] = None
    commands.clear()
    check.diagnose("verify aoti", check.cli("verify", "ART", "--runtime", "aoti"))
    (cmd, env), = commands
    assert cmd[cmd.index("--warm"):] == ["--warm", "none", "--", "--quiet", "verify", "ART", "--runtime", "aoti"]
    assert env["DBRX_AOT_AOTI_LOADER"] == "deepbind" and env["AOTI_RUNTIME_CHECK_INPUTS"] == "1"

    # No way let one: each aoti bench compiles its artifact again in its own process and measures
    # there; both of the small preset's aoti benches after one compile; every slice in a process of
    # its own, started as soon as that was decided, compiled beside the others and measured (CUDA
    # graphs on, then off) in its turn (a lock file of its own); no diagnosis (a fresh process would die alike);
    # the exports for fresh processes are not made.
    check, commands = checked({**outcomes, own: died})
    assert check.workaround is None and check.compile_here and check.bench_here
    assert len(check.slices_here) == len(gpu_check.slice_runs(check.plan))
    concurrent.futures.wait([*check.slices_here.values(), check.bench_here])
    assert check.run_job("slice batch1", check.work / "slice-batch1", [["false"]])[2].startswith("not needed")
    check.stage("slice", check.slice_stage)
    check.stage("bench", check.bench_stage)
    assert all(s["ok"] for s in check.stages[1:]), check.stages
    assert set(check.figures["bench"]["runs"]) == {"eager", "aoti", "aoti_no_cuda_graphs"}
    here = [cmd for cmd, _ in commands if "aoti" in cmd]
    assert len(here) == 1 + len(gpu_check.slice_runs(check.plan))
    assert {cmd[cmd.index("--lock") + 1] for cmd in here} == set(map(str, check.turns.values()))  # a turn each
    slices = [cmd for cmd in here if "slice-" in " ".join(cmd)]
    assert all(" ".join(cmd).count(" bench ") == 2 and cmd[-2:] == ["--no-cuda-graphs", "--in-process"]
               for cmd in slices)
    figures = check.figures["slice"]
    assert {"batch1", "batch1 without CUDA graphs", "batch8", "batch1-grouped without CUDA graphs"} <= set(figures)
    assert figures["batch8"]["weights"] == "same" and figures["batch1-int8 without CUDA graphs"]["weights"] == "int8"
    assert "| 8 | same | auto |" in gpu_check.format_summary(check.summary())
    assert check.figures["bench"]["beside_slices"] == 0  # all five had ended (a real run says how many had not)
    check.figures["bench"]["beside_slices"] = 3
    assert "Measured while 3 slice processes still compiled" in gpu_check.format_summary(check.summary())
    art = str(check.work / "bench-art")
    first, env = next((cmd, env) for cmd, env in commands if "aoti" in cmd and f"{art}-here" in cmd)
    assert first[1:8] == [str(gpu_check.PROBE), "run", "--device", "cuda", "--lock", str(check.turns["bench"]), "--"]
    steps = " ".join(first[8:]).split(" -- ")
    assert steps[0].startswith(f"--quiet export {check.work / 'bench-ckpt'} -o {art}-here ")
    assert [s.split()[1:3] for s in steps[1:]] == [["bench", f"{art}-here"]] * 2
    assert "--no-cuda-graphs" in steps[2].split() and all(s.endswith(" --in-process") for s in steps[1:])
    assert env["TORCHINDUCTOR_CACHE_DIR"] == str(check.work / "inductor-bench-art-here")
    assert not any("verify" in cmd for cmd, _ in commands)
    assert "the aoti benches and slices measured the artifact compiled again" in check.figures["workaround"]
    # Only the .so opened with RTLD_DEEPBIND loaded: every aoti command opens its packages that way
    # (the runtime's DBRX_AOT_AOTI_LOADER=deepbind), in a fresh process with no warm-up.
    check, commands = checked({**outcomes, own: died, deepbind: "ok: loaded: 19 constants at 9.0 s"})
    assert check.workaround[0] == deepbind and not check.compile_here and not check.slices_here
    check.stage("bench", check.bench_stage)
    aoti = [(cmd, env) for cmd, env in commands if "aoti" in cmd]
    assert len(aoti) == 2 and all(cmd[cmd.index("--warm") + 1] == "none" for cmd, _ in aoti)
    assert all(env["DBRX_AOT_AOTI_LOADER"] == "deepbind" for _, env in aoti)


def test_compile_here_decides_at_the_start_and_leaves_the_load_probe_a_diagnosis(tmp_path):
    """--compile-here (the H200 image, where no other process could load a package): the slices start
    compiling where they will be measured at once, the exports for fresh processes are skipped, and
    what the load probe finds later changes nothing."""
    check = make_check(tmp_path, "cuda")
    check.forced_compile_here, check.jobs = True, check.export_jobs()
    check.run = lambda label, cmd, timeout, env=None: (0, "")
    check.decide_loading(None)
    assert check.compile_here and check.loading_decided.is_set()
    assert len(check.slices_here) == len(gpu_check.slice_runs(check.plan))
    check.decide_loading({"decode.pt2": "ok: loaded: 19 constants at 9.0 s"})
    assert check.compile_here and check.workaround is None and "--compile-here" in check.figures["workaround"]
    assert check.run_job("slice batch8", check.work / "slice-batch8", [["false"]])[2].startswith("not needed")


def test_slice_exports_start_at_once_and_stop_when_the_probe_decides_to_compile_where_measured(tmp_path):
    """Without --compile-here a slice's export does not wait for the load probe (its decision comes
    after the small preset's export and the probe's loads: minutes on the H200): it starts at once, and
    a decision to compile where measured stops it (any later one is not started)."""
    check = make_check(tmp_path, "cuda")
    check.stages_chosen = {"probe"}  # the decision then starts no compile of its own
    slow = [["sleep", "60"]]
    job = concurrent.futures.ThreadPoolExecutor(1).submit(check.run_job, "slice batch1", tmp_path / "s1", slow)
    until = time.monotonic() + 10
    while not check.stoppable and time.monotonic() < until:
        time.sleep(0.05)
    assert check.stoppable and not check.loading_decided.is_set()  # started before any decision
    died = "died of SIGSEGV 66 s into the command"
    decided = time.monotonic()
    check.decide_loading({"decode.pt2": died, **{name: died for name, _, _ in gpu_check.LOAD_WORKAROUNDS}})
    assert check.compile_here
    stopped = f"stopped: not needed ({gpu_check.COMPILE_HERE})"
    assert job.result(timeout=10)[::2] == (True, stopped) and time.monotonic() - decided < 10
    assert check.run_job("slice batch8", tmp_path / "s8", slow) == (True, 0.0, f"not needed ({gpu_check.COMPILE_HERE})")
    started = time.monotonic()  # one that started as it was decided is stopped as it starts
    assert check.run("slice batch8", slow[0], 60, stoppable=True)[0] == -9 and time.monotonic() - started < 10
    assert not check.stoppable
    assert check.run_job("bench artifact", tmp_path / "b", [["true"]])[::2] == (True, "ok")  # never stopped
    assert "exit -9" in (tmp_path / "out" / "log.txt").read_text()


def test_slices_compiled_where_measured_measure_one_at_a_time_in_order(tmp_path):
    """COMPILE_HERE slices compile side by side, but each measures only in its turn: this script holds
    every turn's lock file until the tests are done, then hands them out in slice_runs' order, one
    after the slice before has ended (a deadline cuts the last, not the first). Where fewer fit on
    the GPU at once than there are slices (an 80 GB H100), they start in that order too, and the
    measuring waits for no slice still waiting for a slot (that one starts when one before it ends)."""
    check = make_check(tmp_path, "cuda")
    for name, path in check.turns.items():  # as main() does at the start
        check.held_turns[name] = path.open("a")
        fcntl.flock(check.held_turns[name], fcntl.LOCK_EX)
    figures = {"prefill_tokens_per_s": 1.0, "decode_tokens_per_s": 1.0, "decode_ms_p50": 1.0, "decode_ms_p90": 1.0,
               "decode_ms_per_layer": 0.5, "decode_bytes_per_step": 1e9, "fraction_of_bandwidth_limit": 0.5,
               "decode_moe": "gather", "cuda_graphs": True}
    compiled, measured = [], []

    def slice_process(label, path, runs, turn):  # `aoti_load_probe.py run --lock TURN`: compiles, waits for its turn
        compiled.append(label)
        time.sleep(0.1)  # compiling
        turn.with_suffix(".waiting").touch()
        with turn.open("a") as held:
            fcntl.flock(held, fcntl.LOCK_EX)
            measured.append(label)
            time.sleep(0.05)
        return {name: {"copy_bandwidth_gb_s": 2.0, "results": {"aoti": figures}} for name, _ in runs}, []

    check.benches_compiled_here, check.slice_slots = slice_process, gpu_check.OrderedSlots(2)
    runs = gpu_check.slice_runs(check.plan)
    with concurrent.futures.ThreadPoolExecutor(len(runs)) as pool:
        started = {gpu_check.slice_name(run): pool.submit(check.slice_compiled_here, run) for run in reversed(runs)}
        check.slices_here = {name: started[name] for name in check.slice_names}
        time.sleep(0.5)
        assert measured == [] and check.compiling() == []  # two compiled, none measures before its turn
        t = time.monotonic()
        check.stage("slice", check.slice_stage)
        assert time.monotonic() - t < 10 and check.stages[-1]["ok"], check.stages[-1]
    labels = [f"slice {name}" for name in check.slice_names]
    assert measured == labels and set(check.held_turns) == {"bench"}
    assert sorted(compiled[:2]) == sorted(labels[:2]) and compiled[2:] == labels[2:]  # two at once, in order


def test_the_probe_runs_several_cli_commands_in_one_process_and_stops_at_the_first_that_fails(tmp_path):
    """`aoti_load_probe.py run -- A -- B`: the way the GPU check compiles an artifact and measures it
    in one process (COMPILE_HERE). Each command runs in order; a failing one ends the run with its
    exit code, and the commands after it do not run."""
    import subprocess

    probe = [sys.executable, str(gpu_check.PROBE), "run", "--device", "cpu", "--"]

    def tiny(name: str) -> list[str]:
        return ["--quiet", "random-checkpoint", str(tmp_path / name), "--preset", "tiny"]

    ok = subprocess.run([*probe, *tiny("a"), "--", *tiny("b")], capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    assert (tmp_path / "a" / "config.json").is_file() and (tmp_path / "b" / "config.json").is_file()
    failed = subprocess.run([*probe, "--quiet", "inspect", str(tmp_path / "missing"), "--", *tiny("c")],
                            capture_output=True, text=True)
    assert failed.returncode == 2 and "missing: no manifest.json" in failed.stderr and not (tmp_path / "c").exists()
    # --lock: what comes before the first bench runs at once; the bench waits for the lock's holder.
    lock = tmp_path / "measure.lock"
    with lock.open("a") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        waiting = subprocess.Popen([*probe[:-1], "--lock", str(lock), "--", *tiny("d"), "--", "--quiet", "bench",
                                    str(tmp_path / "missing")],
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 120
        while not (tmp_path / "d" / "config.json").is_file() and time.monotonic() < deadline:
            time.sleep(0.2)
        time.sleep(2)
        assert (tmp_path / "d" / "config.json").is_file() and waiting.poll() is None
        assert lock.with_suffix(".waiting").is_file()  # says the commands before the bench are done
    _, err = waiting.communicate(timeout=120)
    assert waiting.returncode == 2 and "missing" in err


def test_benches_compiled_again_in_their_own_process_measure_for_real(gpu_check_dry_run, tmp_path):
    """COMPILE_HERE on CPU, with real commands: the dry run's small-preset export once more, into a
    new directory, then both aoti benches on it, in one process; their reports are the figures; and
    beside it, a slice compiled and measured (in its turn) in a process of its own."""
    args = argparse.Namespace(device="cpu", out=str(tmp_path / "out"), work=str(gpu_check_dry_run.work),
                              deadline=600, skip_install=True, stages="bench,slice", reuse_exports=True,
                              compile_here=False)
    check = gpu_check.Check(args)
    check.python = sys.executable
    check.jobs, check.fresh_load_fails = check.export_jobs(), "died of SIGSEGV (as on the H200)"
    assert check.compile_here
    # A slice the same way, compiled beside the bench's (as the GPU check starts every slice once the
    # load probe has decided) and measured (in its turn: a lock file this script would hand it), profiled.
    first = gpu_check.slice_runs(check.plan)[0]
    sliced = concurrent.futures.ThreadPoolExecutor(1).submit(check.slice_compiled_here, first)
    check.stage("bench", check.bench_stage)
    assert check.stages[0]["ok"], check.stages[0]["detail"]
    runs = check.figures["bench"]["runs"]
    assert set(runs) == {"eager", "aoti", "aoti_no_cuda_graphs"}
    assert all(r["decode_tokens_per_s"] > 0 for r in runs.values())
    assert (gpu_check_dry_run.work / "bench-art-here" / "manifest.json").is_file()
    log = (tmp_path / "out" / "log.txt").read_text()
    assert log.count(f"===== bench aoti ({gpu_check.COMPILE_HERE})") == 1 and "bench-art-here --device cpu" in log
    reports, failed = sliced.result()
    assert not failed and set(reports) == {"aoti"}, failed
    assert reports["aoti"]["results"]["aoti"]["decode_profile"]["rows"]
    assert (gpu_check_dry_run.work / "slice-batch1-here" / "manifest.json").is_file()
