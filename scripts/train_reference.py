"""Train a small DBRX on real text: the quality oracle for weight formats (int8, bf16).

A random checkpoint says whether a compiled graph equals its eager model; it cannot say whether
int8 weights hurt a model's predictions, because a random model predicts nothing. This script
trains a small DBRX (the real 100352-token vocabulary and GPT-4 tokenizer, 16 experts top-4, the
same nn.Module the artifacts are exported from) on the Python standard library's own source,
which every machine with Python has, and writes it in the Hugging Face hub layout in bf16 (the
released model's dtype). ``dbrx-aot verify --reference CKPT --text FILE`` then measures held-out
perplexity per runtime and weight format against it.

The split is fixed: the modules in ``HELD_OUT`` (present in every Python 3 since 3.8) are never
trained on; every other top-level ``*.py`` of the standard library is. Reproducible: a seed, a
fixed number of steps, one data order, a fixed thread count.

    make reference          # ~30 min on 2 cores (the Makefile sets glibc malloc to keep freed
                            # memory: 1.45x faster steps than returning each logits buffer)
"""

from __future__ import annotations

import argparse
import json
import math
import sysconfig
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from dbrx_aot.checkpoint import graph_to_hub, write_checkpoint
from dbrx_aot.config import DbrxConfig
from dbrx_aot.model import DbrxModel, cache_shape
from dbrx_aot.tokenizer import SPECIAL_TOKENS, Tokenizer

# The real vocabulary (the tokenizer's ids), DBRX's expert layout, a width that keeps the bf16
# checkpoint under 30 MB (the two vocabulary matrices are 25.7 MB of it).
CONFIG = DbrxConfig(d_model=64, n_heads=4, n_layers=2, vocab_size=100352, max_seq_len=2048, kv_n_heads=2,
                    clip_qkv=8.0, rope_theta=500000.0, ffn_hidden_size=128, moe_num_experts=16, moe_top_k=4)
HELD_OUT = ("bisect.py", "colorsys.py", "fnmatch.py", "heapq.py", "sched.py", "shlex.py", "textwrap.py")
EXCLUDED = ("this.py", "antigravity.py", "__hello__.py")  # rot13 text, jokes


def stdlib_files() -> tuple[list[Path], list[Path]]:
    """(training files, held-out files) of the running interpreter's standard library."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in root.glob("*.py") if p.name not in EXCLUDED
                   and not p.name.startswith("_sysconfigdata"))  # generated per machine
    return [p for p in files if p.name not in HELD_OUT], [root / name for name in HELD_OUT]


def held_out_text() -> str:
    """The held-out split's text (what ``verify --text`` reads in the tests)."""
    return "\n".join(p.read_text(encoding="utf-8") for p in stdlib_files()[1])


def tokens_of(files: list[Path], tokenizer: Tokenizer) -> torch.Tensor:
    """All files' tokens, each file followed by <|endoftext|>."""
    ids: list[int] = []
    for path in files:
        ids += tokenizer.encode(path.read_text(encoding="utf-8")) + [SPECIAL_TOKENS["<|endoftext|>"]]
    return torch.tensor(ids)


def init_weights(model: DbrxModel, generator: torch.Generator) -> None:
    """GPT-2 style: N(0, 0.02), residual outputs scaled by 1/sqrt(2 L), norms 1."""
    residual = 0.02 / math.sqrt(2 * model.config.n_layers)
    for name, p in model.named_parameters():
        if name.endswith(("norm_1.weight", "norm_2.weight", "norm_f.weight")):
            torch.nn.init.ones_(p)
        else:
            std = residual if name.endswith(("out_proj.weight", "ffn.w2")) else 0.02
            with torch.no_grad():
                p.copy_(torch.randn(p.shape, generator=generator) * std)


def loss_on(model: DbrxModel, batch: torch.Tensor) -> torch.Tensor:
    """Next-token cross entropy of [B, T+1] windows, through the model's own forward (empty cache)."""
    tokens, targets = batch[:, :-1], batch[:, 1:]
    B, T = tokens.shape
    empty = torch.zeros(cache_shape(model.config, B, 0))
    positions = torch.arange(T).expand(B, T)
    logits, _, _ = model(tokens, positions, empty, empty, "dense")
    return F.cross_entropy(logits.reshape(B * T, -1).float(), targets.reshape(-1))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--steps", type=int, default=1100)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--lr", type=float, default=5e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--force", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    tokenizer = Tokenizer()
    train_files, held_files = stdlib_files()
    train, held = tokens_of(train_files, tokenizer), tokens_of(held_files, tokenizer)
    print(f"train: {len(train_files)} files, {len(train)} tokens; held out: {len(held_files)} files, "
          f"{len(held)} tokens", flush=True)

    generator = torch.Generator().manual_seed(args.seed)
    model = DbrxModel(CONFIG)
    init_weights(model, generator)
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    rest = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": rest, "weight_decay": 0.0}],
                            lr=args.lr, betas=(0.9, 0.95))
    warmup = max(1, args.steps // 20)

    def lr_at(step: int) -> float:
        if step < warmup:
            return args.lr * (step + 1) / warmup
        progress = (step - warmup) / max(1, args.steps - warmup)
        return args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))

    window = args.seq + 1
    held_batch = held[: (len(held) // window) * window].view(-1, window)[:16]
    log, start = [], time.time()
    for step in range(args.steps):
        starts = torch.randint(0, len(train) - window, (args.batch,), generator=generator)
        batch = torch.stack([train[s:s + window] for s in starts.tolist()])
        for group in opt.param_groups:
            group["lr"] = lr_at(step)
        loss = loss_on(model, batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % 50 == 0 or step == args.steps - 1:
            with torch.no_grad():
                held_loss = loss_on(model, held_batch).item()
            log.append({"step": step, "train_loss": round(loss.item(), 4), "held_out_loss": round(held_loss, 4),
                        "seconds": round(time.time() - start, 1)})
            print(json.dumps(log[-1]), flush=True)

    out = write_checkpoint(args.out, CONFIG, graph_to_hub(model), dtype=torch.bfloat16, force=args.force,
                           desc="writing the trained checkpoint")
    (out / "training.json").write_text(json.dumps({
        "what": "DBRX trained on the Python standard library (scripts/train_reference.py)",
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "python": sysconfig.get_python_version(), "torch": torch.__version__,
        "train_files": len(train_files), "train_tokens": len(train), "held_out": list(HELD_OUT),
        "held_out_tokens": len(held), "log": log}, indent=2) + "\n")
    print(f"wrote {out}", flush=True)


if __name__ == "__main__":
    main()
