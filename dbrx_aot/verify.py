"""Equivalence as a feature: every runtime of an artifact against the eager model on the same prompts.

For each runtime: the logits of every prompt position and of N cached decode steps (both sides
fed the eager model's greedy tokens), compared as max and mean absolute error, top-1 agreement
and mean KL(eager || runtime); and both sides' own greedy continuations, compared token by token.
"""

from __future__ import annotations

import dataclasses
import gc
from pathlib import Path

import torch
from tqdm.auto import tqdm

from dbrx_aot.app import checksum_option
from dbrx_aot.errors import DbrxAotError
from dbrx_aot.generate import generate
from dbrx_aot.runtimes import Runtime, load_runtime, prefill_chunks


@dataclasses.dataclass(frozen=True)
class Tolerance:
    max_abs: float      # max |logit error|
    min_top1: float     # fraction of positions whose argmax agrees
    max_kl: float       # mean KL(eager || runtime), nats


# The one tolerance table, keyed by (runtime, dtype). fp32 is tight (different kernels, same math);
# half precision allows the rounding of a different operation order.
TOLERANCES: dict[tuple[str, str], Tolerance] = {
    ("reference", "float32"): Tolerance(1e-4, 1.0, 1e-7),  # eager vs transformers' DbrxForCausalLM (tests)
    ("eager", "float32"): Tolerance(1e-5, 1.0, 1e-9),       # eager vs itself rearranged (chunks, batch)
    ("aoti", "float32"): Tolerance(1e-4, 1.0, 1e-7),
    ("onnxruntime", "float32"): Tolerance(1e-4, 1.0, 1e-7),
    ("aoti", "bfloat16"): Tolerance(0.5, 0.95, 2e-2),
    ("onnxruntime", "bfloat16"): Tolerance(0.5, 0.95, 2e-2),
    ("aoti", "float16"): Tolerance(0.1, 0.98, 5e-3),
    ("onnxruntime", "float16"): Tolerance(0.1, 0.98, 5e-3),
}

DEFAULT_PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n",
    "Mixture-of-experts models route each token to a few of many feed-forward networks, so",
    "日本語とEnglish、混ぜて書くと: ",
]


def tolerance(runtime: str, dtype: str) -> Tolerance:
    if (runtime, dtype) in TOLERANCES:
        return TOLERANCES[(runtime, dtype)]
    return TOLERANCES[("aoti", dtype)]  # a third-party runtime is held to the compiled-runtime bar


@dataclasses.dataclass
class RuntimeReport:
    runtime: str
    positions: int
    max_abs_error: float
    mean_abs_error: float
    top1_agreement: float
    mean_kl: float
    greedy_steps: int
    greedy_first_difference: int | None  # None: identical over greedy_steps
    tolerance: Tolerance
    within_tolerance: bool

    def greedy_text(self) -> str:
        if self.greedy_first_difference is None:
            return f"identical over {self.greedy_steps}"
        return f"differs at step {self.greedy_first_difference}"


def artifact_runtimes(formats: list[str]) -> list[str]:
    return [name for fmt, name in (("aoti", "aoti"), ("onnx", "onnxruntime")) if fmt in formats]


def compare(runtime: Runtime, eager: Runtime, prompts: list[list[int]], steps: int) -> dict:
    """Teacher-forced logits over the prompts and ``steps`` decode steps, and free-running greedy."""
    B = runtime.batch_size
    errors, tops, kls, n = [], 0, [], 0
    first_difference = None
    for start in range(0, len(prompts), B):
        group = prompts[start:start + B]
        rows = group + [group[-1]] * (B - len(group))  # fill the static batch; extra rows not counted
        pairs = teacher_forced(runtime, eager, rows, steps)
        for got, expected, valid in pairs:
            # float64: fp32 rounding in log_softmax would swamp a KL of 1e-10 (and make it negative)
            got, expected = got[: len(group)].double(), expected[: len(group)].double()
            mask = valid[: len(group)]
            diff = (got - expected).abs()[mask]
            errors.append(diff)
            tops += int((got.argmax(-1) == expected.argmax(-1))[mask].sum())
            log_p, log_q = torch.log_softmax(expected, -1), torch.log_softmax(got, -1)
            kls.append((log_p.exp() * (log_p - log_q)).sum(-1)[mask])
            n += int(mask.sum())
        ours = generate(runtime, group, max_new_tokens=steps, stop_ids=[])
        ref = generate(eager, group, max_new_tokens=steps, stop_ids=[])
        for a, b in zip(ours, ref):
            d = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None)
            if d is not None and (first_difference is None or d < first_difference):
                first_difference = d
    err = torch.cat(errors)
    return {"positions": n, "max_abs_error": float(err.max()), "mean_abs_error": float(err.mean()),
            "top1_agreement": tops / n, "mean_kl": float(torch.cat(kls).mean()),
            "greedy_first_difference": first_difference}


@torch.inference_mode()
def teacher_forced(runtime: Runtime, eager: Runtime, rows: list[list[int]], steps: int):
    """Yield (runtime logits [B, V], eager logits [B, V], valid rows [B]) for every prompt position
    (chunked prefill) and ``steps`` decode steps fed eager's greedy tokens."""
    B, P, S = runtime.batch_size, runtime.prefill_chunk, runtime.max_seq_len
    lengths = [len(r) for r in rows]
    c_rt, c_eager = runtime.new_cache(), eager.new_cache()
    last = [None] * B
    for start, tokens, positions in prefill_chunks(rows, P, S):
        got, expected = runtime.prefill(tokens, positions, c_rt), eager.prefill(tokens, positions, c_eager)
        for i in range(P):
            valid = torch.tensor([start + i < n for n in lengths])
            yield got[:, i], expected[:, i], valid.to(got.device)
        for b, n in enumerate(lengths):
            if start <= n - 1 < start + P:
                last[b] = expected[b, n - 1 - start].argmax()
    nxt = torch.stack(last)
    for step in range(steps):
        pos = torch.tensor([[min(n + step, S - 1)] for n in lengths])
        valid = torch.tensor([n + step < S for n in lengths])
        got, expected = runtime.decode(nxt[:, None], pos, c_rt), eager.decode(nxt[:, None], pos, c_eager)
        yield got[:, 0], expected[:, 0], valid.to(got.device)
        nxt = expected[:, 0].argmax(-1)


def verify(path: Path, runtimes: list[str] | None = None, prompts: list[str] | None = None, steps: int = 32,
           device: str = "cpu", verify_checksums: bool = True, progress: bool = True) -> list[RuntimeReport]:
    """Compare each runtime of the artifact at ``path`` with the eager model on its weights."""
    from dbrx_aot.export.manifest import Manifest

    manifest = Manifest.read(Path(path))
    names = runtimes or artifact_runtimes(manifest.formats)
    if steps < 1:
        raise DbrxAotError(f"--steps {steps}: expected a positive integer")
    eager = load_runtime(path, "eager", device=device, progress=progress, **checksum_option(verify_checksums))
    texts = prompts or DEFAULT_PROMPTS
    ids = [eager.tokenizer.encode(t)[: eager.max_seq_len - 1] for t in texts]
    if any(not i for i in ids):
        raise DbrxAotError("--prompts: every prompt needs at least one token (an empty line?)")
    steps = min(steps, eager.max_seq_len - max(len(i) for i in ids))
    reports = []
    for name in tqdm(names, desc="verifying runtimes", disable=not progress):
        runtime = load_runtime(path, name, device=device, progress=progress, **checksum_option(verify_checksums))
        result = compare(runtime, eager, ids, steps)
        tol = tolerance(name, manifest.dtype)
        within = (result["max_abs_error"] <= tol.max_abs and result["top1_agreement"] >= tol.min_top1
                  and result["mean_kl"] <= tol.max_kl)
        reports.append(RuntimeReport(runtime=name, greedy_steps=steps, tolerance=tol, within_tolerance=within,
                                     **result))
        del runtime
        gc.collect()
    return reports


def format_table(reports: list[RuntimeReport]) -> str:
    header = f"{'runtime':<13} {'max|Δlogit|':>11} {'mean|Δ|':>9} {'top-1':>7} {'mean KL':>9}  {'greedy':<22} verdict"
    lines = [header, "-" * len(header)]
    for r in reports:
        lines.append(f"{r.runtime:<13} {r.max_abs_error:>11.2e} {r.mean_abs_error:>9.2e} {r.top1_agreement:>7.1%} "
                     f"{r.mean_kl:>9.1e}  {r.greedy_text():<22} "
                     f"{'ok' if r.within_tolerance else 'OUTSIDE TOLERANCE'} (max {r.tolerance.max_abs:g})")
    return "\n".join(lines)


def to_json(reports: list[RuntimeReport], path: Path) -> dict:
    return {"artifact": str(path), "results": [dataclasses.asdict(r) for r in reports],
            "within_tolerance": all(r.within_tolerance for r in reports)}
