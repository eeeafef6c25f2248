"""``inspect``: what an artifact's manifest says, and whether this environment can load each runtime."""

from __future__ import annotations

from pathlib import Path

import torch

from dbrx_aot.manifest import Manifest


def loadability(manifest: Manifest, root: Path) -> dict[str, str | None]:
    """{runtime: None when it can load here, else why not} (file presence only; no checksums)."""
    reasons: dict[str, str | None] = {}
    missing = [rel for rel in manifest.files if not (root / rel).is_file()]
    no_weights = "exported with --skip-weights: no weights" if not manifest.weights else None
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
    return {
        "path": str(root),
        "format_version": m.format_version,
        "formats": m.formats,
        "device": m.device,
        "dtype": m.dtype,
        "shapes": {"batch_size": m.batch_size, "max_seq_len": m.max_seq_len, "prefill_chunk": m.prefill_chunk},
        "moe": {"requested": m.moe, **m.moe_modes},
        "config": m.config.to_dict(),
        "parameters": m.config.param_count(),
        "versions": m.versions,
        "graphs": {name: {"inputs": g["inputs"], "outputs": g.get("outputs"), "files":
                          {k: g[k] for k in ("aoti", "onnx") if k in g}} for name, g in m.graphs.items()},
        "files": {rel: info["bytes"] for rel, info in m.files.items()},
        "total_bytes": sum(info["bytes"] for info in m.files.values()),
        "loadable_here": loadability(m, root),
    }


def format_text(info: dict) -> str:
    c = info["config"]
    lines = [
        f"artifact      {info['path']}  (format v{info['format_version']}: {', '.join(info['formats'])})",
        f"model         DBRX {info['parameters'] / 1e9:.3g}B params: d_model {c['d_model']}, {c['n_layers']} layers, "
        f"{c['n_heads']} heads / {c['kv_n_heads']} kv, {c['moe_num_experts']} experts top-{c['moe_top_k']}, "
        f"vocab {c['vocab_size']}",
        f"built for     {info['device']}, {info['dtype']}, B={info['shapes']['batch_size']} "
        f"S={info['shapes']['max_seq_len']} P={info['shapes']['prefill_chunk']}, MoE {info['moe']['requested']} "
        f"(prefill {info['moe']['prefill']}, decode {info['moe']['decode']})",
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
