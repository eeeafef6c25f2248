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


# Positions a half-precision bar sets aside as near-ties of the reference (``Tolerance``).
NEAR_TIES = 2


@dataclasses.dataclass(frozen=True)
class Tolerance:
    """What a runtime must meet against its reference.

    fp32: absolute bars against the eager model (same dtype, same weights): ``max_abs`` (max
    |logit error|), ``min_top1`` (fraction of positions whose argmax agrees), ``max_kl`` (mean
    KL(reference || runtime), nats).

    Half precision (``kl_factor`` set): a half-precision artifact and a half-precision eager model
    differ by rounding in a different order, and neither is the truth. Both are measured against
    the fp32 eager model on the same (rounded) weights, and the runtime must be at least about as
    close to it as half-precision eager is (the baseline): typical KL (``typical_kl``) <= kl_factor
    x the baseline's + max_kl, and top-1 >= the baseline's top-1 - top1_margin, a margin of never
    fewer than ``NEAR_TIES`` of the result's positions. Both set aside NEAR_TIES positions because
    a rounding flip at one near-tie of the reference lands either way: it costs a top-1 position,
    and at a peaked logit a KL of ~5e-3 at that one position, more than the ~90 others of ``verify
    --steps 8`` together (measured on the tiny bf16 artifact: one such position doubled its mean).
    max |logit error| is reported, not judged (one rounding flip on a peaked logit says little).
    """

    max_abs: float | None
    min_top1: float | None
    max_kl: float
    kl_factor: float | None = None
    top1_margin: float = 0.0

    @property
    def relative(self) -> bool:
        return self.kl_factor is not None

    def admits(self, result: dict, baseline: dict | None = None) -> bool:
        if self.relative:
            assert baseline is not None
            positions = result.get("positions")
            margin = max(self.top1_margin, NEAR_TIES / positions) if positions else self.top1_margin
            return (result["typical_kl"] <= self.kl_factor * baseline["typical_kl"] + self.max_kl
                    and result["top1_agreement"] >= baseline["top1_agreement"] - margin - 1e-9)  # k/n rounding
        return ((self.max_abs is None or result["max_abs_error"] <= self.max_abs)
                and result["top1_agreement"] >= self.min_top1 and result["mean_kl"] <= self.max_kl)

    def describe(self, dtype: str) -> str:
        if self.relative:
            return (f"typical KL <= {self.kl_factor:g}x eager {dtype}'s + {self.max_kl:g}, "
                    f"top-1 >= eager {dtype}'s - {self.top1_margin:.0%} (at least {NEAR_TIES} positions)")
        if self.max_abs is None:
            return f"KL <= {self.max_kl:g}, top-1 >= {self.min_top1:.0%}"
        return f"max {self.max_abs:g}"


# The one tolerance table, keyed by (runtime, dtype). fp32 is tight (different kernels, same math).
# Half precision is relative to the half-precision eager model's own distance from fp32 (measured on
# the tiny preset, CPU, 183 positions, typical KL: bf16 eager 4.6e-5 / top-1 95.6%, bf16 aoti 4.0e-5 /
# 95.6%; fp16 eager 1.0e-6 / 99.5%, aoti 2.9e-7, onnxruntime 1.1e-7): 2x its KL and 2 points of
# top-1 leave room for another kernel's rounding without admitting a wrong graph (orders of
# magnitude off).
INT8_ACTIVATIONS = "float32, int8 activations"
_BF16 = Tolerance(max_abs=None, min_top1=None, max_kl=1e-5, kl_factor=2.0, top1_margin=0.02)
_FP16 = Tolerance(max_abs=None, min_top1=None, max_kl=1e-6, kl_factor=2.0, top1_margin=0.02)
TOLERANCES: dict[tuple[str, str], Tolerance] = {
    ("reference", "float32"): Tolerance(1e-4, 1.0, 1e-7),  # eager vs transformers' DbrxForCausalLM (tests)
    ("eager", "float32"): Tolerance(1e-5, 1.0, 1e-9),       # eager vs itself rearranged (chunks, batch)
    ("aoti", "float32"): Tolerance(1e-4, 1.0, 1e-7),
    ("onnxruntime", "float32"): Tolerance(1e-4, 1.0, 1e-7),
    ("eager", "bfloat16"): _BF16,
    ("aoti", "bfloat16"): _BF16,
    ("onnxruntime", "bfloat16"): _BF16,
    ("eager", "float16"): _FP16,
    ("aoti", "float16"): _FP16,
    ("onnxruntime", "float16"): _FP16,
    # int8 artifacts exported with --onnx-accuracy-level 4: MatMulNBits quantises the activations to
    # int8 per block (~0.7% relative error per matmul), which the eager model on the same weights
    # does not. Measured against eager int8 on verify's default prompts: tiny preset (random) KL
    # 3.8e-5, top-1 96.6%; the trained reference (reference/dbrx-stdlib, out-of-domain prompts for a
    # model of Python code) KL 6.1e-3, top-1 95.8%. A wrong graph (a swapped expert, a dropped
    # scale) is at KL ~1. Its quality is measured by held-out perplexity (verify --reference).
    ("onnxruntime", INT8_ACTIVATIONS): Tolerance(max_abs=None, min_top1=0.9, max_kl=2e-2),
}

DEFAULT_PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n",
    "Mixture-of-experts models route each token to a few of many feed-forward networks, so",
    "日本語とEnglish、混ぜて書くと: ",
]


def tolerance(runtime: str, dtype: str, onnx_accuracy_level: int | None = None) -> Tolerance:
    if runtime == "onnxruntime" and onnx_accuracy_level == 4:
        return TOLERANCES[(runtime, INT8_ACTIVATIONS)]
    if (runtime, dtype) in TOLERANCES:
        return TOLERANCES[(runtime, dtype)]
    return TOLERANCES[("aoti", dtype)]  # a third-party runtime is held to the compiled-runtime bar


@dataclasses.dataclass
class RuntimeReport:
    runtime: str
    reference: str                # what it was compared with: "eager float32", ...
    positions: int
    max_abs_error: float
    mean_abs_error: float
    top1_agreement: float
    mean_kl: float
    typical_kl: float             # mean KL without the NEAR_TIES largest positions (half-precision bar)
    greedy_steps: int
    greedy_first_difference: int | None  # None: identical over greedy_steps
    tolerance: Tolerance
    within_tolerance: bool

    def greedy_text(self) -> str:
        if self.greedy_first_difference is None:
            return f"identical over {self.greedy_steps}"
        return f"differs at step {self.greedy_first_difference}"


@dataclasses.dataclass
class Verification:
    artifact: str
    dtype: str
    reference: str
    baseline: dict | None         # half precision: eager {dtype} against the fp32 reference
    reports: list[RuntimeReport]
    skipped: dict[str, str]       # runtime -> why it cannot run here (with --runtime all)

    @property
    def within_tolerance(self) -> bool:
        return all(r.within_tolerance for r in self.reports)


def artifact_runtimes(formats: list[str]) -> list[str]:
    return [name for fmt, name in (("aoti", "aoti"), ("onnx", "onnxruntime")) if fmt in formats]


def kl_divergence(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """KL(p || q) per position from log-probabilities [..., V] (float64: fp32 rounding would swamp a
    KL of 1e-10 and make it negative)."""
    return (log_p.exp() * (log_p - log_q)).sum(-1)


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
            got, expected = got[: len(group)].double(), expected[: len(group)].double()
            mask = valid[: len(group)]
            diff = (got - expected).abs()[mask]
            errors.append(diff)
            tops += int((got.argmax(-1) == expected.argmax(-1))[mask].sum())
            log_p, log_q = torch.log_softmax(expected, -1), torch.log_softmax(got, -1)
            kls.append(kl_divergence(log_p, log_q)[mask])
            n += int(mask.sum())
        ours = generate(runtime, group, max_new_tokens=steps, stop_ids=[])
        ref = generate(eager, group, max_new_tokens=steps, stop_ids=[])
        for a, b in zip(ours, ref):
            d = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None)
            if d is not None and (first_difference is None or d < first_difference):
                first_difference = d
    err, kl = torch.cat(errors), torch.cat(kls)
    typical = kl.sort().values[: max(1, n - NEAR_TIES)]
    return {"positions": n, "max_abs_error": float(err.max()), "mean_abs_error": float(err.mean()),
            "top1_agreement": tops / n, "mean_kl": float(kl.mean()), "typical_kl": float(typical.mean()),
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
        index = torch.arange(min(P, max(lengths) - start)).expand(B, -1)  # [B, R]: past R, padding in every row
        got = runtime.prefill(tokens, positions, c_rt, index)
        expected = eager.prefill(tokens, positions, c_eager, index)
        for i in range(index.shape[1]):
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
           device: str = "cpu", verify_checksums: bool = True, progress: bool = True) -> Verification:
    """Compare each runtime of the artifact at ``path`` with the eager model on its weights.

    fp32 artifacts: against eager fp32. Half-precision artifacts: against eager fp32 on the same
    (rounded) weights, next to eager in the artifact's dtype as the baseline (``Tolerance``).
    ``runtimes=None`` means every format the artifact holds; one that cannot run here (say bf16 on
    onnxruntime's CPU provider) is skipped with the reason instead of failing the whole check.
    """
    from dbrx_aot.manifest import Manifest

    manifest = Manifest.read(Path(path))
    explicit = runtimes is not None
    names = runtimes or artifact_runtimes(manifest.formats)
    if steps < 1:
        raise DbrxAotError(f"--steps {steps}: expected a positive integer")
    options = dict(device=device, progress=progress, **checksum_option(verify_checksums))
    half = manifest.dtype != "float32"
    reference = load_runtime(path, "eager", dtype="float32", **options)
    texts = prompts or DEFAULT_PROMPTS
    ids = [reference.tokenizer.encode(t)[: reference.max_seq_len - 1] for t in texts]
    if any(not i for i in ids):
        raise DbrxAotError("--prompts: every prompt needs at least one token (an empty line?)")
    steps = min(steps, reference.max_seq_len - max(len(i) for i in ids))
    baseline = None
    if half:
        eager_half = load_runtime(path, "eager", **options)
        baseline = compare(eager_half, reference, ids, steps)
        del eager_half
    reports, skipped = [], {}
    for name in tqdm(names, desc="verifying runtimes", disable=not progress):
        try:
            runtime = load_runtime(path, name, **options)
        except DbrxAotError as err:
            if explicit:
                raise
            skipped[name] = str(err)
            continue
        result = compare(runtime, reference, ids, steps)
        tol = tolerance(name, manifest.dtype, manifest.onnx_accuracy_level)
        reports.append(RuntimeReport(runtime=name, reference="eager float32", greedy_steps=steps, tolerance=tol,
                                     within_tolerance=tol.admits(result, baseline), **result))
        del runtime
        gc.collect()
    if not reports:
        raise DbrxAotError(f"{path}: no runtime of this artifact can run here ("
                           + "; ".join(f"{n}: {why}" for n, why in skipped.items()) + ")")
    return Verification(artifact=str(path), dtype=manifest.dtype, reference="eager float32", baseline=baseline,
                        reports=reports, skipped=skipped)


def format_table(result: Verification) -> str:
    lines = []
    if result.baseline is not None:
        b = result.baseline
        lines.append(f"{result.dtype} artifact: every runtime against eager float32 on the same weights; "
                     f"eager {result.dtype} itself: top-1 {b['top1_agreement']:.1%}, mean KL {b['mean_kl']:.1e} "
                     f"(typical {b['typical_kl']:.1e}), "
                     f"max|Δlogit| {b['max_abs_error']:.2e}")
    header = f"{'runtime':<13} {'max|Δlogit|':>11} {'mean|Δ|':>9} {'top-1':>7} {'mean KL':>9} {'typical':>9}  {'greedy':<22} verdict"
    lines += [header, "-" * len(header)]
    for r in result.reports:
        lines.append(f"{r.runtime:<13} {r.max_abs_error:>11.2e} {r.mean_abs_error:>9.2e} {r.top1_agreement:>7.1%} "
                     f"{r.mean_kl:>9.1e} {r.typical_kl:>9.1e}  {r.greedy_text():<22} "
                     f"{'ok' if r.within_tolerance else 'OUTSIDE TOLERANCE'} ({r.tolerance.describe(result.dtype)})")
    for name, why in result.skipped.items():
        lines.append(f"{name:<13} skipped: {why}")
    return "\n".join(lines)


def to_json(result: Verification) -> dict:
    data = dataclasses.asdict(result)
    data["results"] = data.pop("reports")
    return {**data, "within_tolerance": result.within_tolerance}
