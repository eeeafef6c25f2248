"""Quality against a reference model: held-out perplexity of each runtime next to the unquantised model.

``verify`` proves a compiled graph equals the eager model on the artifact's own weights. Whether
those weights (int8, bf16) are as good as the original ones is a different question, answered on a
model trained on real text (``scripts/train_reference.py``) and on text it never saw: every
runtime and the reference (eager fp32 on the original checkpoint) read the same windows of the
text in lock step; for each one, held-out perplexity, and against the reference top-1 agreement
and mean KL(reference || runtime), over every predicted position.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import torch
from tqdm.auto import tqdm

from dbrx_aot.app import checksum_option
from dbrx_aot.errors import DbrxAotError
from dbrx_aot.runtimes import Runtime, load_runtime, prefill_chunks
from dbrx_aot.verify import artifact_runtimes, kl_divergence


@dataclasses.dataclass
class QualityReport:
    runtime: str                  # "reference" for the original checkpoint itself
    weights: str                  # the weight format it reads: same, bfloat16, int8 (or the reference's dtype)
    tokens: int                   # predicted positions
    perplexity: float
    perplexity_change: float      # relative to the reference's (0.01 = 1% higher)
    top1_agreement: float         # with the reference's argmax
    mean_kl: float                # KL(reference || runtime), nats


@dataclasses.dataclass
class Quality:
    reference: str
    texts: list[str]
    window: int                   # tokens per window (the artifact's cache length)
    reports: list[QualityReport]

    def worst_change(self) -> float:
        return max(r.perplexity_change for r in self.reports if r.runtime != "reference")


def read_windows(texts: list[Path], runtime: Runtime) -> list[list[int]]:
    """Each text's tokens cut into windows of the runtime's cache length (a tail shorter than 2 tokens
    predicts nothing and is dropped)."""
    windows = []
    for path in texts:
        try:
            text = Path(path).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as err:
            raise DbrxAotError(f"--text {path}: cannot read it as UTF-8 text ({err})") from None
        ids = runtime.tokenizer.encode(text)
        S = runtime.max_seq_len
        windows += [ids[i:i + S] for i in range(0, len(ids), S) if len(ids[i:i + S]) >= 2]
    if not windows:
        raise DbrxAotError(f"--text {', '.join(map(str, texts))}: no text to score (fewer than 2 tokens)")
    return windows


@torch.inference_mode()
def measure(runtimes: dict[str, Runtime], reference: Runtime, windows: list[list[int]],
            progress: bool = True) -> dict[str, dict]:
    """Lock-step prefill of every window through the reference and each runtime; per runtime the
    summed NLL, top-1 matches and KL over every position that has a next token."""
    B, P, S = reference.batch_size, reference.prefill_chunk, reference.max_seq_len
    stats = {name: {"nll": 0.0, "top1": 0, "kl": 0.0, "n": 0} for name in ["reference", *runtimes]}
    groups = [windows[i:i + B] for i in range(0, len(windows), B)]
    bar = tqdm(total=sum(len(w) for w in windows), desc="scoring held-out text", unit="tok", disable=not progress)
    for group in groups:
        rows = group + [group[-1]] * (B - len(group))  # fill the static batch; extra rows not counted
        caches = {name: rt.new_cache() for name, rt in runtimes.items()}
        ref_cache = reference.new_cache()
        for start, tokens, positions in prefill_chunks(rows, P, S):
            # position start+i predicts token start+i+1 of its row, when the row has one
            target = torch.full((B, P), -1, dtype=torch.int64)
            for b, row in enumerate(group):
                nxt = row[start + 1:start + P + 1]
                target[b, :len(nxt)] = torch.tensor(nxt, dtype=torch.int64)
            R = int((target >= 0).sum(1).max())  # each row's targets come first: positions past R have none
            if R == 0:
                continue
            target, index = target[:, :R], torch.arange(R).expand(B, R)
            valid = target >= 0
            ref_logits = reference.prefill(tokens, positions, ref_cache, index)
            ref_logp = torch.log_softmax(ref_logits.double().cpu(), -1)[valid]
            gold = target[valid]
            _accumulate(stats["reference"], ref_logp, gold, ref_logp)
            for name, rt in runtimes.items():
                logp = torch.log_softmax(rt.prefill(tokens, positions, caches[name], index).double().cpu(), -1)[valid]
                _accumulate(stats[name], logp, gold, ref_logp)
            bar.update(int(valid.sum()))
    bar.close()
    return stats


def _accumulate(acc: dict, logp: torch.Tensor, gold: torch.Tensor, ref_logp: torch.Tensor) -> None:
    acc["nll"] -= float(logp.gather(1, gold[:, None]).sum())
    acc["top1"] += int((logp.argmax(-1) == ref_logp.argmax(-1)).sum())
    acc["kl"] += float(kl_divergence(ref_logp, logp).sum())
    acc["n"] += len(gold)


def held_out_quality(path: Path, reference: Path, texts: list[Path], runtimes: list[str] | None = None,
                     device: str = "cpu", verify_checksums: bool = True, progress: bool = True) -> Quality:
    """Perplexity of the artifact's runtimes (and of eager on its weights) on ``texts``, next to
    the eager fp32 model of the original ``reference`` checkpoint with the same static shapes."""
    from dbrx_aot.manifest import Manifest

    manifest = Manifest.read(Path(path))
    if Path(reference).resolve() == Path(path).resolve():
        raise DbrxAotError("--reference: give the original checkpoint, not the artifact itself")
    options = dict(device=device, progress=progress, **checksum_option(verify_checksums))
    ref = load_runtime(reference, "eager", device=device, dtype="float32", batch_size=manifest.batch_size,
                       max_seq_len=manifest.max_seq_len, prefill_chunk=manifest.prefill_chunk, progress=progress)
    if ref.config != manifest.config:
        raise DbrxAotError(f"--reference {reference}: its config.json is not the artifact's model "
                           f"(config of {path}/manifest.json)")
    names = ["eager", *(runtimes or artifact_runtimes(manifest.formats))]
    loaded = {name: load_runtime(path, name, **options) for name in dict.fromkeys(names)}
    windows = read_windows(texts, ref)
    stats = measure(loaded, ref, windows, progress)
    ref_ppl = math.exp(stats["reference"]["nll"] / stats["reference"]["n"])
    reports = []
    for name, s in stats.items():
        ppl = math.exp(s["nll"] / s["n"])
        reports.append(QualityReport(
            runtime=name, weights="float32 (original)" if name == "reference" else manifest.weights_format,
            tokens=s["n"], perplexity=ppl, perplexity_change=ppl / ref_ppl - 1,
            top1_agreement=s["top1"] / s["n"], mean_kl=s["kl"] / s["n"]))
    return Quality(reference=str(reference), texts=[str(t) for t in texts], window=manifest.max_seq_len,
                   reports=reports)


def format_quality(q: Quality, dtype: str) -> str:
    lines = [f"held-out text: {q.reports[0].tokens} predicted tokens in windows of {q.window}; reference "
             f"{q.reference} (eager float32)"]
    header = f"{'runtime':<13} {'weights':<19} {'perplexity':>10} {'vs ref':>8} {'top-1':>7} {'mean KL':>9}"
    lines += [header, "-" * len(header)]
    for r in q.reports:
        weights = r.weights if r.runtime == "reference" else f"{r.weights}, {dtype}"
        lines.append(f"{r.runtime:<13} {weights:<19} {r.perplexity:>10.3f} {r.perplexity_change:>+8.2%} "
                     f"{r.top1_agreement:>7.1%} {r.mean_kl:>9.1e}")
    return "\n".join(lines)
