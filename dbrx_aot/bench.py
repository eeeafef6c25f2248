"""Benchmarks, every runtime in one run, against eager and against the device's memory bandwidth.

Decode is memory bound: each step must read the weights it uses (the top-k experts for gather,
all experts for dense, plus attention, norms, router and lm_head) and the KV cache (the static
graph attends over all S slots). Bytes per step times steps per second, divided by a bandwidth
measured here on the same device in the same run, is the fraction of the limit reached. Two limits
are measured: the read bandwidth (a large streaming reduction, the way decode reads its weights:
each byte read once, nothing written back; best of a sum and a matrix-vector product, each best of
several runs), the headline; and a large copy's (read + write), kept beside it. A copy also writes,
so on a CPU it reaches less than a read-only stream: a fraction of it overstates.
"""

from __future__ import annotations

import faulthandler
import gc
import multiprocessing
import os
import resource
import signal
import statistics
import time
import traceback
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from dbrx_aot.app import checksum_option
from dbrx_aot.config import DbrxConfig
from dbrx_aot.errors import DbrxAotError
from dbrx_aot.devices import resolve_device
from dbrx_aot.runtimes import Runtime, load_runtime, prefill_chunks
from dbrx_aot.tp import all_gather_into, init_from_env, python_group, world


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def probe_bytes(device: torch.device) -> int:
    """How much a bandwidth probe moves: 2 GiB on CUDA (~1 ms at 3 TB/s, so the host timer and the
    sync are a small part of it), 512 MiB on CPU."""
    return 1 << 31 if device.type == "cuda" else 1 << 29


def best_seconds(device: torch.device, fn, repeats: int) -> float:
    """The fastest of ``repeats`` timed runs of ``fn``, after one untimed run (it faults the pages in)."""
    best = float("inf")
    for _ in range(repeats + 1):
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        best = min(best, time.perf_counter() - start)
    return best


def copy_bandwidth(device: torch.device, nbytes: int | None = None, repeats: int = 5) -> float:
    """Bytes/s of a large device copy (read + write counted), best of ``repeats``."""
    nbytes = nbytes or probe_bytes(device)
    src = torch.ones(nbytes // 4, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    return 2 * nbytes / best_seconds(device, lambda: dst.copy_(src), repeats)


def read_bandwidth(device: torch.device, nbytes: int | None = None, repeats: int = 5) -> float:
    """Bytes/s of a large streaming read: the best of a full sum and a matrix-vector product over the
    same bytes (each the best of ``repeats`` runs)."""
    nbytes = nbytes or probe_bytes(device)
    src = torch.ones(nbytes // 4, dtype=torch.float32, device=device)
    rows, vector = src.view(-1, 4096), torch.ones(4096, dtype=torch.float32, device=device)
    return nbytes / min(best_seconds(device, src.sum, repeats), best_seconds(device, lambda: rows @ vector, repeats))


def decode_bytes(config: DbrxConfig, batch_size: int, max_seq_len: int, moe: str, itemsize: int,
                 weights_format: str = "same", tp: int = 1) -> dict[str, int]:
    """Bytes one decode step must read, by part, on one rank of ``tp``. ``itemsize``: the compute
    dtype's (cache, norms, router, embedding); the matrices are read as stored (``weights_format``):
    bf16 2 bytes, int8 1 byte plus an fp32 scale per output channel. Under tensor parallelism the
    matrices and the cache are split, the router, norms and embedding replicated (tp.TP_SPLITS)."""
    D, F, E, k, V = (config.d_model, config.ffn_hidden_size // tp, config.moe_num_experts, config.moe_top_k,
                     config.vocab_size // tp)
    L, qkv = config.n_layers, config.qkv_size // tp
    m = {"same": itemsize, "bfloat16": 2, "int8": 1}[weights_format]  # bytes per matrix element
    s = 4 if weights_format == "int8" else 0                             # bytes per output channel
    experts = E if moe == "dense" else min(E, batch_size * k)  # gather, grouped: at most B*k distinct experts
    return {
        "attention": L * ((qkv * D + D * D // tp) * m + (qkv + D) * s),
        "experts": L * experts * (3 * F * D * m + (2 * F + D) * s),
        "router_norms": L * (E * D + 2 * D) * itemsize + D * itemsize,
        "lm_head": V * D * m + V * s,
        "embedding_rows": batch_size * D * itemsize,
        "kv_cache": 2 * L * batch_size * config.kv_n_heads // tp * max_seq_len * config.head_dim * itemsize,
    }


def rss_gb() -> float:
    with open(f"/proc/{os.getpid()}/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 1e9


# Rows of a decode profile (bench --profile): the kernels (CPU: operators) that take the most time.
PROFILE_ROWS = 12


def profile_decode(rt: Runtime, nxt: torch.Tensor, start: int, cache, steps: int) -> dict:
    """``steps`` decode steps (positions ``start``..: slots the timed steps wrote, rewritten) under
    torch.profiler: the kernels by their own time on the device (operators by their own CPU time on
    a CPU, where AOTInductor's own C++ kernels are no operators and go uncounted), per step, largest
    first, and their sum per step (beside the step's time: on a GPU the rest is the device idle).
    Where Inductor fused a gather into its reduction, the kernel's name says so
    (``triton_red_fused_index_select_mul_sum_N``)."""
    from torch.profiler import ProfilerActivity, profile

    on_device = rt.device.type == "cuda"
    B = rt.batch_size
    with profile(activities=[ProfilerActivity.CPU] + [ProfilerActivity.CUDA] * on_device) as prof:
        for i in range(steps):
            logits = rt.decode(nxt, torch.full((B, 1), start + i), cache)
            nxt = logits[:, 0].argmax(-1, keepdim=True)
        sync(rt.device)
    events = [e for e in prof.key_averages() if not on_device or e.self_device_time_total > 0]
    own = (lambda e: e.self_device_time_total) if on_device else (lambda e: e.self_cpu_time_total)
    total = sum(own(e) for e in events) or 1
    return {"ms_per_step": total / 1e3 / steps,
            "rows": [{"name": e.key, "ms_per_step": own(e) / 1e3 / steps, "calls_per_step": e.count / steps,
                      "share": own(e) / total} for e in sorted(events, key=own, reverse=True)[:PROFILE_ROWS]]}


@torch.inference_mode()
def bench_runtime(rt: Runtime, prompt_len: int, new_tokens: int, repeats: int = 3, profile_steps: int = 0) -> dict:
    B, P, S = rt.batch_size, rt.prefill_chunk, rt.max_seq_len
    if prompt_len + new_tokens > S:
        raise DbrxAotError(f"--prompt-len {prompt_len} + --new-tokens {new_tokens} exceed the cache of {S} positions")
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, min(rt.config.vocab_size, 100000), (B, prompt_len), generator=g)
    # As generation runs it: logits at each row's last prompt token only (chunks before it: any position).
    chunks = [(tokens, positions, torch.full((B,), min(P, prompt_len - start) - 1))
              for start, tokens, positions in prefill_chunks(prompt.tolist(), P, S)]

    def run_prefill(cache):
        for tokens, positions, index in chunks:
            logits = rt.prefill(tokens, positions, cache, index)
        return logits

    cache = rt.new_cache()
    run_prefill(cache)  # warm-up (first-call work: allocations, lazy initialisation, a CUDA graph capture)
    rt.decode(prompt[:, :1], torch.full((B, 1), prompt_len), cache)
    prefill_times = []
    # The timed runs reuse the warm-up's cache (a CUDA graph is per cache): prefill rewrites the
    # prompt's slots, and each decode step writes its slot before any step can read it.
    for _ in range(repeats):
        sync(rt.device)
        start = time.perf_counter()
        logits = run_prefill(cache)
        sync(rt.device)
        prefill_times.append(time.perf_counter() - start)
    nxt = logits[:, 0].argmax(-1, keepdim=True)
    step_ms = []
    for i in range(new_tokens):
        positions = torch.full((B, 1), prompt_len + i)
        sync(rt.device)
        start = time.perf_counter()
        logits = rt.decode(nxt, positions, cache)
        nxt = logits[:, 0].argmax(-1, keepdim=True)
        sync(rt.device)
        step_ms.append(1e3 * (time.perf_counter() - start))
    prefill_s = statistics.median(prefill_times)
    quantiles = statistics.quantiles(step_ms, n=10) if len(step_ms) > 1 else step_ms * 9
    mean_ms = statistics.fmean(step_ms)
    result = {
        "prefill_tokens_per_s": B * prompt_len / prefill_s,
        "decode_tokens_per_s": B * 1e3 / mean_ms,
        "decode_steps_per_s": 1e3 / mean_ms,
        "decode_ms_p50": statistics.median(step_ms),
        "decode_ms_p90": quantiles[8],
    }
    if profile_steps:  # after the timed steps, so that the profiler's cost is in none of them
        result["decode_profile"] = profile_decode(rt, nxt, prompt_len, cache, min(profile_steps, new_tokens))
    return result


def aoti_options(runtimes: list[str], cuda_graphs: bool | None, random_weights: int | None) -> dict:
    """The aoti runtime's bench options; asking them of another runtime is an error."""
    if random_weights is not None and runtimes != ["aoti"]:
        raise DbrxAotError(f"--random-weights: only the aoti runtime binds random weights (asked for "
                           f"{', '.join(runtimes)}); pass --runtime aoti")
    if cuda_graphs is not None and "aoti" not in runtimes:
        raise DbrxAotError("--cuda-graphs/--no-cuda-graphs: only the aoti runtime has CUDA graphs; add --runtime aoti")
    options = {} if cuda_graphs is None else {"cuda_graphs": cuda_graphs}
    return options if random_weights is None else {**options, "random_weights": random_weights}


def bench(path: Path, runtimes: list[str], device: str = "cpu", prompt_len: int = 64, new_tokens: int = 32,
          verify_checksums: bool = True, progress: bool = True, cuda_graphs: bool | None = None,
          random_weights: int | None = None, isolate: bool = True, profile_steps: int = 0) -> dict:
    """Each runtime in turn, each in a fresh process of its own (so its memory figures are its own,
    not what an earlier runtime left allocated): load time, prefill and decode speed, memory, and
    the fraction of the memory-bandwidth limit decode reaches (the bandwidth is measured here, in
    the same run, on the same device). ``isolate=False`` measures them in this process instead.

    ``cuda_graphs`` and ``random_weights`` are aoti options (runtimes/aoti.py); random weights let
    a compile-only (--skip-weights) artifact at real width be measured. ``profile_steps``: that many
    decode steps profiled after the timed ones (``profile_decode``), into ``decode_profile``."""
    for option, value in (("--prompt-len", prompt_len), ("--new-tokens", new_tokens)):
        if value < 1:
            raise DbrxAotError(f"{option} {value}: expected a positive integer")
    if profile_steps < 0:
        raise DbrxAotError(f"--profile {profile_steps}: expected a number of decode steps, 0 or more")
    options = aoti_options(runtimes, cuda_graphs, random_weights)
    dev = resolve_device(device)
    bandwidth, read_limit = copy_bandwidth(dev), read_bandwidth(dev)
    if dev.type == "cuda":
        torch.cuda.empty_cache()  # the copy's buffers: give the device back to the runtimes' processes
    results = {}
    init_from_env(dev)  # under torchrun: join its world before anything runs
    tp = world()[1]
    isolated = isolate and tp == 1  # under torchrun each rank measures in its own process, in lock step
    for name in tqdm(runtimes, desc="benchmarking", disable=not progress):
        args = (path, name, device, prompt_len, new_tokens, verify_checksums, options if name == "aoti" else {},
                profile_steps)
        if isolated:
            result = run_isolated(f"the {name} runtime", bench_one, *args)
        else:
            result = bench_one(*args)
            gc.collect()
        result["fraction_of_bandwidth_limit"] = result["decode_bandwidth_gb_s"] * 1e9 / bandwidth
        result["fraction_of_read_limit"] = result["decode_bandwidth_gb_s"] * 1e9 / read_limit
        result["random_weights"] = random_weights if name == "aoti" else None
        results[name] = result
    config_src = load_manifest_or_none(path)
    return {"artifact": str(path), "device": device, "torch": torch.__version__, "threads": torch.get_num_threads(),
            "prompt_len": prompt_len, "new_tokens": new_tokens, "copy_bandwidth_gb_s": bandwidth / 1e9,
            "read_bandwidth_gb_s": read_limit / 1e9, "tp": tp, "isolated": isolated,
            "collective_ms_per_decode_step": collective_ms(path, dev) if tp > 1 else None,
            "shapes": config_src, "results": results}


class RemoteTraceback(Exception):
    """The traceback of an exception raised in another process, as text (its __cause__ here)."""

    def __str__(self) -> str:
        return self.args[0]


def run_isolated(what: str, fn, *args):
    """``fn(*args)`` in a fresh interpreter (spawn: no memory, threads or CUDA state inherited): its
    result, or its exception raised here (the child's traceback as the cause). A child that dies
    without reporting (a segfault in compiled code, an abort, the OOM killer) is a DbrxAotError
    naming the signal; faulthandler is on in the child, so a crash prints its Python stack first."""
    spawn = multiprocessing.get_context("spawn")
    receive, send = spawn.Pipe(duplex=False)
    child = spawn.Process(target=_isolated, args=(send, fn, args), daemon=True)
    child.start()
    send.close()  # the child holds the only writer: its death ends recv() with EOFError
    try:
        ok, value, text = receive.recv()
    except EOFError:
        child.join()
        code = child.exitcode
        how = f"of {signal.Signals(-code).name}" if code is not None and code < 0 else f"with exit code {code}"
        raise DbrxAotError(f"{what}: its process died {how} before it reported (its stack, where the "
                           "interpreter could print one, is above)") from None
    finally:
        receive.close()
    child.join()
    if ok:
        return value
    raise value from RemoteTraceback(text)


def _isolated(send, fn, args) -> None:
    faulthandler.enable()
    try:
        report = (True, fn(*args), "")
    except BaseException as err:  # everything goes back to the parent, which raises it
        report = (False, err, traceback.format_exc())
    try:
        send.send(report)
    except Exception as err:  # an unpicklable result or exception: say so instead of dying silently
        send.send((False, RuntimeError(f"{type(report[1]).__name__} could not be sent back: {err}"), report[2]))
    send.close()


def collective_ms(path: Path, device: torch.device, repeats: int = 20) -> float:
    """The collectives of one decode step of the artifact at ``path`` alone, on this world (2
    all_reduces of [B, 1, D] per layer, one all_gather of the [B, 1, V/N] logits), in ms: the
    median of ``repeats``."""
    from dbrx_aot.manifest import Manifest

    m = Manifest.read(path)
    c, B = m.config, m.batch_size
    dtype, group, tp = m.torch_dtype(), python_group(), world()[1]
    x = torch.zeros(B, 1, c.d_model, dtype=dtype, device=device)
    part = torch.zeros(B, 1, c.vocab_size // tp, dtype=dtype, device=device)
    gathered = torch.empty(tp * B, 1, c.vocab_size // tp, dtype=dtype, device=device)
    times = []
    for _ in range(repeats + 1):
        sync(device)
        start = time.perf_counter()
        for _ in range(2 * c.n_layers):
            dist.all_reduce(x, group=group)
        all_gather_into(gathered, part, group=group)
        sync(device)
        times.append(1e3 * (time.perf_counter() - start))
    return statistics.median(times[1:])


def bench_one(path: Path, name: str, device: str, prompt_len: int, new_tokens: int, verify_checksums: bool,
              options: dict, profile_steps: int = 0) -> dict:
    """One runtime, measured in the calling process (``bench`` runs it in a process of its own)."""
    base_rss = rss_gb()
    start = time.perf_counter()
    rt = load_runtime(path, name, device=device, progress=False, **checksum_option(verify_checksums), **options)
    load_s = time.perf_counter() - start
    if rt.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(rt.device)
    result = bench_runtime(rt, prompt_len, new_tokens, profile_steps=profile_steps)
    shapes = load_manifest_or_none(path)
    weights_format = shapes["weights_format"] if shapes else "same"
    parts = decode_bytes(rt.config, rt.batch_size, rt.max_seq_len, rt.decode_moe, rt.dtype.itemsize, weights_format,
                         getattr(rt, "tp", 1))
    step_bytes = sum(parts.values())
    result.update({
        "pid": os.getpid(),
        "load_s": load_s,
        "rss_gb_after": rss_gb(),
        "rss_gb_added": rss_gb() - base_rss,
        "rss_gb_peak": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6,
        "cuda_max_allocated_gb": (torch.cuda.max_memory_allocated(rt.device) / 1e9
                                  if rt.device.type == "cuda" else None),
        "decode_moe": rt.decode_moe,
        "decode_bytes_per_step": step_bytes,
        "decode_bytes_by_part": parts,
        "decode_bandwidth_gb_s": step_bytes * result["decode_steps_per_s"] / 1e9,
        # The step's time over its layers (embedding, final norm and lm_head included).
        "decode_ms_per_layer": result["decode_ms_p50"] / rt.config.n_layers,
        "cuda_graphs": getattr(rt, "cuda_graphs", False),  # an aoti attribute, not in the protocol
    })
    return result


def load_manifest_or_none(path: Path) -> dict | None:
    from dbrx_aot.manifest import MANIFEST, Manifest

    if not (Path(path) / MANIFEST).is_file():
        return None
    m = Manifest.read(Path(path))
    return {"batch_size": m.batch_size, "max_seq_len": m.max_seq_len, "prefill_chunk": m.prefill_chunk,
            "tp": m.tp,
            "dtype": m.dtype, "weights_format": m.weights_format, "onnx_accuracy_level": m.onnx_accuracy_level,
            "moe_modes": m.moe_modes,
            # how the AOTInductor decode graph computes gathered experts (export --moe-kernel)
            "decode_moe_kernel": m.graphs["decode"].get("aoti_moe_kernel", "inductor")}


def format_table(report: dict) -> str:
    header = (f"{'runtime':<13} {'prefill tok/s':>13} {'decode tok/s':>12} {'p50 ms':>8} {'p90 ms':>8} "
              f"{'GB/s':>7} {'of read':>8} {'of copy':>8} {'RSS GB':>7} {'vs eager':>8}")
    if report["tp"] > 1:
        processes = (f"tensor parallel, {report['tp']} ranks (torchrun): figures of rank 0 (bytes and RSS per rank); "
                     f"a decode step's collectives alone take {report['collective_ms_per_decode_step']:.2f} ms")
    elif report["isolated"]:
        processes = "RSS: each runtime's own process after the run (each runs in a fresh process)"
    else:
        processes = "RSS: this process after each runtime's run (--in-process: what the runtimes before it left counts)"
    lines = [f"read bandwidth {report['read_bandwidth_gb_s']:.1f} GB/s (the limit), copy "
             f"{report['copy_bandwidth_gb_s']:.1f} GB/s, on {report['device']} "
             f"(torch {report['torch']}, {report['threads']} threads)", processes,
             *([f"weights stored as {report['shapes']['weights_format']}, computed in {report['shapes']['dtype']}"
                + (f"; onnxruntime MatMulNBits accuracy level {report['shapes']['onnx_accuracy_level']}"
                   if report['shapes']['onnx_accuracy_level'] is not None else "")
                + ("; aoti decode's gathered experts on the Triton kernels"
                   if report['shapes'].get('decode_moe_kernel') == "triton" else "")]
               if report["shapes"] else []),
             header, "-" * len(header)]
    base = report["results"].get("eager", {}).get("decode_tokens_per_s")
    for name, r in report["results"].items():
        speedup = f"{r['decode_tokens_per_s'] / base:.2f}x" if base else "-"
        lines.append(f"{name:<13} {r['prefill_tokens_per_s']:>13.1f} {r['decode_tokens_per_s']:>12.1f} "
                     f"{r['decode_ms_p50']:>8.2f} {r['decode_ms_p90']:>8.2f} {r['decode_bandwidth_gb_s']:>7.2f} "
                     f"{r['fraction_of_read_limit']:>8.1%} {r['fraction_of_bandwidth_limit']:>8.1%} "
                     f"{r['rss_gb_after']:>7.2f} {speedup:>8}")
    lines.append("decode ms per layer (p50 / layers): " + ", ".join(
        f"{name} {r['decode_ms_per_layer']:.3f}{' (CUDA graphs)' if r['cuda_graphs'] else ''}"
        for name, r in report["results"].items()))
    for name, r in report["results"].items():
        if r.get("decode_profile"):
            prof = r["decode_profile"]
            lines += [f"{name}: a decode step's {'kernels' if report['device'].startswith('cuda') else 'operators'}, "
                      f"profiled after the timed steps: {prof['ms_per_step']:.3f} ms a step in all (the step's p50: "
                      f"{r['decode_ms_p50']:.3f} ms); ms a step, calls a step, share"]
            lines += [f"  {row['ms_per_step']:8.3f} {row['calls_per_step']:6.1f} {row['share']:6.1%}  {row['name']}"
                      for row in prof["rows"]]
    return "\n".join(lines)
