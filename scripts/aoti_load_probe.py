"""Does an AOTInductor package load in a process that did not compile it? The pieces of the GPU
check's load probe (scripts/gpu_check.py runs them; so can you).

    python scripts/aoti_load_probe.py build DIR --device cuda
    python scripts/aoti_load_probe.py load DIR/linear-in-so.pt2 --device cuda --reference DIR/linear.pt
    python scripts/aoti_load_probe.py run --warm aoti-compile -- --quiet bench ART --runtime aoti --in-process
    python scripts/aoti_load_probe.py run -- export CKPT -o ART2 --device cuda -- bench ART2 --runtime aoti --in-process

Why: on the H200 (torch 2.11.0+cu130), every CUDA package of dbrx-aot died of SIGSEGV inside
``AOTIModelPackageLoader``'s constructor when a fresh process loaded it (``verify``, ``bench``,
``serve``, a bare ``python3 -c "aoti_load_package(...)"`` with or without CUDA initialised first),
about 45 s after the call, while the process that had compiled it loaded and ran it. ``build``
compiles a two-layer MLP twice, with the weights in the .so (torch's default) and kept out of it as
dbrx-aot builds its packages (``export.aoti.inductor_configs``: the weights out of the .so, which
exports only AOTInductor's C API); ``load`` loads one package in a fresh process after an optional
warm-up, as dbrx-aot's runtime opens one (``DBRX_AOT_AOTI_LOADER=container``: without torch's
package loader), prints each step's time, and where it has a reference, runs it against eager.
Which of these die says whether it is dbrx-aot's graphs, its options, the package loader, or
AOTInductor on that machine, and which warm-up or loader (if any) is a workaround. ``run`` is that
workaround applied: a warm-up, then the dbrx-aot CLI in the same process, one command or several in
a row (the GPU check measures with it where a plain fresh process cannot load a package: after the
warm-up that let one, or, where none did, after compiling the artifact again in that process, as the
GPU tests that pass compile and load theirs).
"""

from __future__ import annotations

import argparse
import fcntl
import re
import signal
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable
from pathlib import Path

# What a loading process may do first, in a fresh process, before it loads the package.
WARM_UPS = ("none", "cuda-tensor", "compile", "aoti-compile", "aoti-compile-load")
# libstdc++'s symbols that the crash's stack goes through (std::regex in AOTInductorModel's
# parse_device_str: the locale, its collate facet's id): which loaded library each resolves to.
# And one std::regex instance that libtorch and libc10 export (built by torch's compiler): whether they are
# in the global scope, where a .so exporting the same instances binds to theirs.
STD_SYMBOLS = ("_ZNSt6locale7classicEv", "_ZNSt6localeC1Ev", "_ZNSt7__cxx117collateIcE2idE",
               "_ZNSt5ctypeIcE2idE", "_ZNSt8__detail8_ScannerIcE19_M_scan_in_bracketEv")


def mlp(device: str):
    import torch

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.GELU(), torch.nn.Linear(128, 32)).to(device)
    return model.eval(), torch.randn(4, 64, device=device)


def compile_mlp(path: Path, device: str, configs: dict) -> None:
    import torch
    import torch._inductor

    model, x = mlp(device)
    with torch.no_grad():
        program = torch.export.export(model, (x,))
        torch._inductor.aoti_compile_and_package(program, package_path=str(path), inductor_configs=configs)


def build(out: Path, device: str) -> None:
    """linear-in-so.pt2 (weights in the .so), linear-user-constants.pt2 (dbrx-aot's options: the
    weights bound at load), and linear.pt (the input, eager's output and the weights)."""
    import torch

    from dbrx_aot.export.aoti import inductor_configs

    out.mkdir(parents=True, exist_ok=True)
    compile_mlp(out / "linear-in-so.pt2", device, {})
    compile_mlp(out / "linear-user-constants.pt2", device, inductor_configs())
    model, x = mlp(device)
    with torch.no_grad():
        expected = model(x)
    torch.save({"x": x.cpu(), "expected": expected.cpu(),
                "weights": {k: v.detach().cpu() for k, v in model.state_dict().items()}}, out / "linear.pt")


def warm_up(how: str, device: str) -> None:
    """The process state a compile leaves behind, in steps: a CUDA context (``cuda-tensor``), Inductor
    and Triton having compiled and run a kernel (``compile``), AOTInductor having compiled a package
    (``aoti-compile``, as the process that compiled dbrx-aot's package had)."""
    import torch

    if how == "cuda-tensor":
        torch.zeros(1, device=device).add_(1)
    elif how == "compile":
        torch.compile(lambda t: t * 2 + 1)(torch.ones(8, device=device))
    elif how in ("aoti-compile", "aoti-compile-load"):
        with tempfile.TemporaryDirectory() as tmp:
            compile_mlp(Path(tmp) / "warm.pt2", device, {})
            if how == "aoti-compile-load":  # a package this process compiled: does it load here?
                from dbrx_aot.runtimes.aoti import open_package

                model, x = mlp(device)
                with torch.no_grad():
                    got = open_package(Path(tmp) / "warm.pt2", torch.device(device))(x)
                    torch.testing.assert_close(got, model(x), rtol=1e-4, atol=1e-4)
                print("probe: a package this process compiled loaded and ran", flush=True)


def std_library_report(package: Path) -> list[str]:
    """Where the process resolves the libstdc++ symbols that the fresh-load crash's stack goes
    through, which loaded libraries define std::locale themselves, and what the package's .so holds
    of libstdc++: whether a second copy of the C++ library's locale is what it reads."""
    import ctypes
    import os
    import subprocess
    import zipfile

    class DlInfo(ctypes.Structure):
        _fields_ = [("fname", ctypes.c_char_p), ("fbase", ctypes.c_void_p), ("sname", ctypes.c_char_p),
                    ("saddr", ctypes.c_void_p)]

    scope = ctypes.CDLL(None)  # the process's global scope, as an unqualified dlsym sees it
    dladdr = scope.dladdr
    dladdr.argtypes = [ctypes.c_void_p, ctypes.POINTER(DlInfo)]
    lines = []
    for symbol in STD_SYMBOLS:
        try:
            address = ctypes.addressof(ctypes.c_char.in_dll(scope, symbol))
        except ValueError:
            lines.append(f"{symbol}: not in the global scope")
            continue
        info = DlInfo()
        dladdr(address, ctypes.byref(info))
        lines.append(f"{symbol}: {(info.fname or b'?').decode()}")

    def nm(path: str, which: str = "--defined-only") -> list[str]:
        out = subprocess.run(["nm", "-D", which, path], capture_output=True, text=True)
        return out.stdout.splitlines()

    with open(f"/proc/{os.getpid()}/maps") as maps:
        libraries = sorted({line.split()[-1] for line in maps if ".so" in line.rsplit("/", 1)[-1]})
    own = [f"{lib} ({n})" for lib in libraries
           if (n := sum("_ZNSt6locale" in sym for sym in nm(lib))) and "libstdc++" not in lib]
    lines.append(f"{len(libraries)} libraries loaded; defining std::locale besides libstdc++: {own or 'none'}")
    with tempfile.TemporaryDirectory() as tmp, zipfile.ZipFile(package) as archive:
        name = next((n for n in archive.namelist() if n.endswith(".wrapper.so")), None)
        if name is not None:
            so = archive.extract(name, tmp)
            symbols = nm(so)
            dynamic = subprocess.run(["readelf", "-d", so], capture_output=True, text=True).stdout
            needs = ", ".join(re.findall(r"Shared library: \[([^]]+)\]", dynamic))
            unshift = any("_ZNKSt7codecvtIDsc11__mbstate_tE10do_unshift" in sym for sym in symbols)
            beyond = [sym.split()[-1] for sym in symbols if not sym.split()[-1].startswith("AOTInductor")]
            unique = [sym.split()[-1] for sym in symbols if sym.split()[1] == "u"]
            cxx = [sym for sym in nm(so, "--undefined-only") if sym.split()[0] == "U"
                   and re.search(r"U _Z|@GLIBCXX|@CXXABI", sym)]
            lines.append(f"the package's .so: {len(symbols)} symbols defined, {len(beyond)} of them beyond "
                         f"AOTInductor's C API ({len(unique)} GNU-unique: one copy process-wide), "
                         f"{sum('_ZNSt6locale' in sym for sym in symbols)} of std::locale, "
                         f"codecvt<char16_t>::do_unshift {'defined' if unshift else 'not defined'}; "
                         f"{len(cxx)} C++ symbols imported; needs {needs}"
                         + ("; linked -Bsymbolic" if "SYMBOLIC" in dynamic else ""))
    return lines


def watch_main_thread(every: float) -> Callable[[], None]:
    """Print the main thread's Python stack every ``every`` s until the returned function is called:
    where a slow step spends its time. Read under the GIL, so a stack comes late (when the main thread
    lets go of the GIL) rather than torn: faulthandler's watchdog reads it without the GIL, and under
    gdb it crashed on a frame an import was building (CI, CPU). The function also waits for the
    watcher to end: a watcher still printing while the interpreter shuts down was aborted there
    ("terminate called without an active exception", SIGABRT after a load that had succeeded; CI, CPU)."""
    main, stop = threading.main_thread().ident, threading.Event()

    def loop() -> None:
        while not stop.wait(every):
            frame = sys._current_frames().get(main)
            if frame is not None:
                print("probe main thread's stack:\n" + "".join(traceback.format_stack(frame)), end="", flush=True)

    watcher = threading.Thread(target=loop, daemon=True)
    watcher.start()

    def stop_watching() -> None:
        stop.set()
        watcher.join()

    return stop_watching


def load(package: Path, device: str, warm: str, reference: Path | None, interrupt_after: float,
         libraries: bool = False) -> None:
    """Opened as dbrx-aot's runtime opens a package (``open_package``: torch's package loader, or with
    DBRX_AOT_AOTI_LOADER=container its .so by the container runner alone)."""
    t0 = time.monotonic()

    def say(step: str) -> None:
        print(f"probe {time.monotonic() - t0:7.1f} s: {step}", flush=True)

    stop_watching = watch_main_thread(15)
    try:
        load_steps(package, device, warm, reference, interrupt_after, libraries, say)
    finally:
        stop_watching()


def load_steps(package: Path, device: str, warm: str, reference: Path | None, interrupt_after: float,
               libraries: bool, say: Callable[[str], None]) -> None:
    """``load``'s steps, each said as it ends."""
    import torch

    from dbrx_aot.runtimes.aoti import open_package

    say(f"torch {torch.__version__} imported")
    warm_up(warm, device)
    say(f"warm-up {warm} done")
    if libraries:
        try:
            report = std_library_report(package)
        except Exception as err:  # a tool missing (nm, readelf): the load still runs, as the way it is
            report = [f"no report ({type(err).__name__}: {err})"]
        for line in report:
            say(f"libstdc++: {line}")
    timer = None
    if interrupt_after > 0:  # under a debugger: stop the main thread once, so that its native stack is printed
        main = threading.main_thread().ident
        timer = threading.Timer(interrupt_after, lambda: signal.pthread_kill(main, signal.SIGTRAP))
        timer.daemon = True
        timer.start()
    runner = open_package(package, torch.device(device))
    if timer is not None:
        timer.cancel()
    fqns = runner.get_constant_fqns()
    say(f"loaded: {len(fqns)} constants")
    if reference is not None:
        ref = torch.load(reference)
        # Bound, not copied (user_managed): the tensors must outlive the runs, as the runtime's weights do.
        weights = {f: ref["weights"][f].to(device) for f in fqns}
        if weights and "user-constants" in package.name:
            runner.load_constants(weights, check_full_update=True, user_managed=True)
        with torch.no_grad():
            got = runner(ref["x"].to(device))
        torch.testing.assert_close(got.cpu(), ref["expected"], rtol=1e-4, atol=1e-4)
        say("ran: matches eager")


def run_cli(argv: list[str], lock: Path | None = None) -> int:
    """The dbrx-aot CLI in this process, once per command (commands separated by ``--``), in order;
    the first that fails ends the run with its exit code. With ``lock``, the first ``bench`` and all
    after it run holding that file's lock (flock), so that processes compiling side by side measure
    one at a time; a file beside it (``.waiting``) says that the commands before are done."""
    from dbrx_aot.cli import cli

    commands: list[list[str]] = [[]]
    for arg in argv:
        if arg == "--":
            commands.append([])
        else:
            commands[-1].append(arg)
    for command in filter(None, commands):
        if lock is not None and "bench" in command[:2]:
            import torch

            if torch.cuda.is_available():
                # The export before let go of its model (export's release_traces: a slice's 15.5 GB);
                # what the allocator still caches goes back to the device while this process waits.
                torch.cuda.empty_cache()
            lock.with_suffix(".waiting").touch()  # what came before is done (the GPU check waits for this)
            held = lock.open("a")
            fcntl.flock(held, fcntl.LOCK_EX)  # released when this process ends
            lock = None
        try:
            cli.main(args=command, prog_name="dbrx-aot")
        except SystemExit as done:  # click's standalone mode ends every command with one
            if done.code:
                return done.code if isinstance(done.code, int) else 1
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build", help="compile the MLP's two packages and its reference into DIR")
    b.add_argument("dir", type=Path)
    b.add_argument("--device", default="cuda")
    ld = sub.add_parser("load", help="load one package in this (fresh) process")
    ld.add_argument("package", type=Path)
    ld.add_argument("--device", default="cuda")
    ld.add_argument("--warm", choices=WARM_UPS, default="none")
    ld.add_argument("--reference", type=Path, help="linear.pt from build: run the package against eager")
    ld.add_argument("--interrupt-after", type=float, default=0.0,
                    help="send the main thread SIGTRAP after this many seconds of loading (for a debugger)")
    ld.add_argument("--libraries", action="store_true",
                    help="before loading: where libstdc++'s locale symbols resolve, and what the .so holds of them")
    r = sub.add_parser("run", help="warm up, then run the dbrx-aot CLI (the arguments after --; several commands "
                                    "separated by --) in this process")
    r.add_argument("--device", default="cuda")
    r.add_argument("--warm", choices=WARM_UPS, default="none")
    r.add_argument("--lock", type=Path, help="measure (from the first bench on) holding this file's lock")
    r.add_argument("cli", nargs=argparse.REMAINDER)
    args = parser.parse_args()
    if args.command == "run":
        warm_up(args.warm, args.device)
        return run_cli(args.cli, args.lock)
    elif args.command == "build":
        build(args.dir, args.device)
    else:
        load(args.package, args.device, args.warm, args.reference, args.interrupt_after, args.libraries)
    return 0


if __name__ == "__main__":
    sys.exit(main())
