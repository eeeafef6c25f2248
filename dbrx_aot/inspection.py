"""``inspect``: what an artifact's manifest says, whether this environment can load each runtime, and
the memory plan: bytes per component in each weight format, and how much KV cache a GPU has left."""

from __future__ import annotations

import math
from pathlib import Path

import torch

from dbrx_aot.checkpoint import stored_specs
from dbrx_aot.config import DbrxConfig, parse_dtype
from dbrx_aot.manifest import Manifest
from dbrx_aot.tp import undivided

# Parameter name -> component (first match wins).
COMPONENTS = (("embedding", ("wte.",)), ("attention", (".attn.",)), ("experts", (".ffn.w1", ".ffn.v1", ".ffn.w2")),
              ("router + norms", (".router.", "norm")), ("lm_head", ("lm_head.",)))
TP_DEGREES = (1, 2, 4, 8)  # what the preset plans show: one GPU, and the usual tensor-parallel groups
# Devices a plan is drawn for: what torch reports as usable on each (GiB), and what is kept back for
# the CUDA context, activations and workspaces.
DEVICES_GIB = {"H100 80GB": 78.0, "H200 141GB": 139.0}
RESERVE_GIB = 3.0
GIB = 1 << 30


def memory_plan(config: DbrxConfig, dtype: str, weights_format: str, tp: int = 1) -> dict:
    """Bytes of each component as stored on one rank of ``tp`` (read off the meta-device model:
    exact), the KV cache per token on a rank, and per device the tokens of KV cache left beside the
    weights (every rank caches the same tokens, for its share of the kv heads)."""
    parts = {name: 0 for name, _ in COMPONENTS}
    for key, (shape, dt) in stored_specs(config, parse_dtype(dtype), weights_format, tp).items():
        part = next(name for name, marks in COMPONENTS if any(m in key for m in marks))
        parts[part] += math.prod(shape) * dt.itemsize
    total = sum(parts.values())
    kv = 2 * config.n_layers * (config.kv_n_heads // tp) * config.head_dim * parse_dtype(dtype).itemsize
    devices = {}
    for device, gib in DEVICES_GIB.items():
        left = gib * GIB - RESERVE_GIB * GIB - total
        devices[device] = {"fits": left > 0, "kv_tokens": max(0, int(left // kv))}
    return {"weights_format": weights_format, "dtype": dtype, "tp": tp, "bytes": parts, "total_bytes": total,
            "kv_bytes_per_token": kv, "devices": devices}


def preset_plans(config: DbrxConfig, dtype: str) -> list[dict]:
    """The plan of every weight format at every TP degree in ``TP_DEGREES`` the config divides."""
    from dbrx_aot.quantize import WEIGHT_FORMATS

    degrees = [n for n in TP_DEGREES if undivided(config, n) is None]
    return [memory_plan(config, dtype, fmt, tp) for fmt in WEIGHT_FORMATS for tp in degrees
            if not (fmt == "bfloat16" and dtype != "float32")]  # bf16 storage is for fp32 compute


def rank_plan(m: Manifest, plan: dict) -> dict:
    """What one rank of this artifact holds at run time: its weights (``plan``, the artifact's
    ``memory_plan``), its KV cache at the artifact's B and S, and an estimate of the largest
    intermediates of either graph (logits, attention scores, expert activations), the workspace."""
    c, tp = m.config, m.tp
    itemsize = parse_dtype(m.dtype).itemsize
    weights = plan["total_bytes"]
    kv = 2 * c.n_layers * m.batch_size * (c.kv_n_heads // tp) * m.max_seq_len * c.head_dim * itemsize
    F, H = c.ffn_hidden_size // tp, c.n_heads // tp
    workspace = 0
    for graph, T in (("prefill", m.prefill_chunk), ("decode", 1)):
        N = m.batch_size * T
        logits = N * c.vocab_size * itemsize * (1 + 1 / tp)                       # local part + gathered
        scores = 2 * m.batch_size * H * T * (m.max_seq_len + T) * 4               # fp32 scores and probs
        experts = {"dense": 3 * c.moe_num_experts * N * F * itemsize,           # every expert's activations
                   "grouped": 3 * N * c.moe_top_k * (F + c.d_model) * itemsize,  # each slot's rows and products
                   "gather": 3 * N * c.moe_top_k * F * c.d_model * itemsize,     # gathered weight rows
                   }[m.moe_modes[graph]]
        workspace = max(workspace, int(logits + scores + experts))
    return {"tp": tp, "weights_bytes": weights, "kv_cache_bytes": kv, "workspace_estimate_bytes": workspace,
            "total_bytes": weights + kv + workspace}


def format_plan(config: DbrxConfig, plans: list[dict], seq_lens=(4096, 32768)) -> str:
    lines = [f"memory plan: {config.param_count() / 1e9:.3g}B parameters; KV cache "
             f"{plans[0]['kv_bytes_per_token'] / 1024:.0f} KiB per token ({plans[0]['dtype']}) in one process, "
             f"divided by the TP degree on each rank; each GPU keeps {RESERVE_GIB:g} GiB back for the CUDA context "
             "and activations. Bytes are per rank (per GPU); 'tok' is the KV cache the group holds."]
    names = [name for name, _ in COMPONENTS]
    header = f"{'weights':<9} {'tp':>2} " + " ".join(f"{n:>14}" for n in names) + f" {'total':>9}"
    lines += [header + "  " + "  ".join(f"{d:>28}" for d in DEVICES_GIB), "-" * (len(header) + 30 * len(DEVICES_GIB))]
    for plan in plans:
        row = f"{plan['weights_format']:<9} {plan['tp']:>2} " + " ".join(f"{_gb(plan['bytes'][n]):>14}" for n in names)
        row += f" {_gb(plan['total_bytes']):>9}"
        for device in DEVICES_GIB:
            fit = plan["devices"][device]
            cell = ("does not fit" if not fit["fits"] else
                    f"{fit['kv_tokens']:,} tok: " + ", ".join(f"{fit['kv_tokens'] // s} x {s // 1024}k"
                                                             for s in seq_lens))
            row += f"  {cell:>28}"
        lines.append(row)
    return "\n".join(lines)


def _gb(n: int) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e8 else f"{n / 1e6:.1f} MB" if n >= 1e5 else f"{n / 1e3:.1f} kB"


def loadability(manifest: Manifest, root: Path) -> dict[str, str | None]:
    """{runtime: None when it can load here, else why not} (file presence only; no checksums)."""
    reasons: dict[str, str | None] = {}
    missing = [rel for rel in manifest.files if not (root / rel).is_file()]
    no_weights = "exported with --skip-weights: no weights" if not manifest.has_weights() else None
    if manifest.tp > 1:
        no_weights = no_weights or f"needs {manifest.tp} ranks: torchrun --nproc-per-node {manifest.tp} -m dbrx_aot ..."
    gpu = manifest.device == "cuda" and not torch.cuda.is_available()
    reasons["eager"] = no_weights
    if "aoti" in manifest.formats:
        built = manifest.versions.get("torch")
        reasons["aoti"] = (no_weights
                           or (f"built by torch {built}, this is torch {torch.__version__}"
                               if built != torch.__version__ else None)
                           or ("compiled for CUDA and no GPU is visible" if gpu else None))
    if "onnx" in manifest.formats:
        try:
            import onnxruntime as ort
            providers = ort.get_available_providers()
            reasons["onnxruntime"] = no_weights or (
                "bfloat16 needs the CUDA execution provider" if manifest.dtype == "bfloat16"
                and (not torch.cuda.is_available() or "CUDAExecutionProvider" not in providers) else None)
        except ImportError:
            reasons["onnxruntime"] = "onnxruntime is not installed"
    if missing:
        for name in reasons:
            reasons[name] = reasons[name] or f"missing file {missing[0]}"
    return reasons


def describe(path: Path) -> dict:
    root = Path(path)
    m = Manifest.read(root)
    plan = memory_plan(m.config, m.dtype, m.weights_format, m.tp)
    onnx_moe = {g: m.onnx_moe(g) for g in m.moe_modes} if "onnx" in m.formats else m.moe_modes
    return {
        "path": str(root),
        "format_version": m.format_version,
        "formats": m.formats,
        "device": m.device,
        "dtype": m.dtype,
        "shapes": {"batch_size": m.batch_size, "max_seq_len": m.max_seq_len, "prefill_chunk": m.prefill_chunk},
        "moe": {"requested": m.moe, **m.moe_modes,  # the ONNX graphs' forms too, where they differ
                **({"onnx": onnx_moe} if onnx_moe != m.moe_modes else {})},
        "config": m.config.to_dict(),
        "parameters": m.config.param_count(),
        "versions": m.versions,
        "graphs": {name: {"inputs": g["inputs"], "outputs": g.get("outputs"), "files":
                          {k: g[k] for k in ("aoti", "onnx") if k in g}} for name, g in m.graphs.items()},
        "files": {rel: info["bytes"] for rel, info in m.files.items()},
        "total_bytes": sum(info["bytes"] for info in m.files.values()),
        "weights_format": m.weights_format,
        "onnx_accuracy_level": m.onnx_accuracy_level,
        "memory_plan": plan,
        "per_rank": rank_plan(m, plan),
        "loadable_here": loadability(m, root),
    }


def format_text(info: dict) -> str:
    c, rank = info["config"], info["per_rank"]
    lines = [
        f"artifact      {info['path']}  (format v{info['format_version']}: {', '.join(info['formats'])})",
        f"model         DBRX {info['parameters'] / 1e9:.3g}B params: d_model {c['d_model']}, {c['n_layers']} layers, "
        f"{c['n_heads']} heads / {c['kv_n_heads']} kv, {c['moe_num_experts']} experts top-{c['moe_top_k']}, "
        f"vocab {c['vocab_size']}",
        f"built for     {info['device']}, {info['dtype']}, B={info['shapes']['batch_size']} "
        f"S={info['shapes']['max_seq_len']} P={info['shapes']['prefill_chunk']}, MoE {info['moe']['requested']} "
        f"(prefill {info['moe']['prefill']}, decode {info['moe']['decode']}"
        + "".join(f"; onnx {g} {form}" for g, form in info["moe"].get("onnx", {}).items() if form != info["moe"][g])
        + ")",
        f"weights       stored as {info['weights_format']}" + (
            f"; ONNX linear layers as MatMulNBits, accuracy level {info['onnx_accuracy_level']}"
            if info["onnx_accuracy_level"] is not None else "") + ": " + ", ".join(
            f"{part} {_gb(n)}" for part, n in info["memory_plan"]["bytes"].items()),
        f"{'per rank' if rank['tp'] > 1 else 'at run time':<13} " + (f"{rank['tp']} ranks (torchrun), each: "
                                                                    if rank["tp"] > 1 else "")
        + f"weights {_gb(rank['weights_bytes'])}, KV cache at B and S {_gb(rank['kv_cache_bytes'])}, workspace ~"
        f"{_gb(rank['workspace_estimate_bytes'])} (estimate), ~{_gb(rank['total_bytes'])} in all",
        "built with    " + ", ".join(f"{k} {v}" for k, v in info["versions"].items() if v),
        "graphs",
    ]
    for name, g in info["graphs"].items():
        ins = ", ".join(f"{i['name']}{i['shape']}" for i in g["inputs"])
        lines.append(f"  {name:<8} ({ins}) -> logits; files: {', '.join(g['files'].values())}")
    lines.append(f"files         {info['total_bytes'] / 1e6:.1f} MB in all")
    lines += [f"  {size / 1e6:10.1f} MB  {rel}" for rel, size in sorted(info["files"].items())]
    lines.append("loadable here")
    for name, why in info["loadable_here"].items():
        lines.append(f"  {name:<12} {'yes' if why is None else 'no: ' + why}")
    return "\n".join(lines)
