"""``export_artifact``: a Hugging Face DBRX checkpoint -> an artifact directory (DESIGN.md).

Written into a temporary directory beside the target and renamed into place at the end, so an
interrupted export (Ctrl-C, kill, full disk) never leaves anything at the target that loads.
"""

from __future__ import annotations

import dataclasses
import errno
import logging
import platform
import shutil
from contextlib import ExitStack, nullcontext
from pathlib import Path

import torch
from tqdm.auto import tqdm

import dbrx_aot
from dbrx_aot.checkpoint import checkpoint_shards, hub_to_graph_keys, iter_stored, stored_specs
from dbrx_aot.config import DbrxConfig, check_static_shapes, parse_dtype
from dbrx_aot.errors import DbrxAotError
from dbrx_aot.manifest import FORMAT_VERSION, WEIGHTS_DIR, Manifest, sha256_file
from dbrx_aot.export.trace import (GRAPHS, GraphSpec, attention_extents, empty_model, io_description, release_traces,
                                   resolve_attention, resolve_moe_kernel, stage)
from dbrx_aot.model import project_ops, resolve_moe_mode
from dbrx_aot.quantize import check_weights_format, stored_names
from dbrx_aot.devices import resolve_device
from dbrx_aot.safetensors_io import StreamingWriter, open_checked
from dbrx_aot.staging import replace_dir, staging_dir
from dbrx_aot.tokenizer import Tokenizer
from dbrx_aot.tp import check_tp, compile_world, shard

log = logging.getLogger("dbrx_aot.export")

FORMATS = ("aoti", "onnx")


@dataclasses.dataclass
class ExportReport:
    path: Path
    timings: dict[str, dict]
    sizes: dict[str, int]  # relative path -> bytes


def versions() -> dict[str, str | None]:
    found: dict[str, str | None] = {"dbrx_aot": dbrx_aot.__version__, "torch": torch.__version__,
                                    "cuda": torch.version.cuda, "python": platform.python_version()}
    for name in ("onnx", "onnxscript", "onnxruntime"):
        try:
            found[name] = __import__(name).__version__
        except ImportError:
            found[name] = None
    return found


def parse_formats(formats: str | tuple[str, ...] | list[str]) -> tuple[str, ...]:
    items = tuple(f.strip() for f in (formats.split(",") if isinstance(formats, str) else formats) if f.strip())
    bad = [f for f in items if f not in FORMATS]
    if bad or not items:
        raise DbrxAotError(f"--format {','.join(items) or '(empty)'}: expected aoti, onnx or aoti,onnx")
    return tuple(f for f in FORMATS if f in items)


def export_artifact(checkpoint: Path | None, out: Path, *, formats="aoti", device="cpu", dtype="float32",
                    batch_size: int = 1, max_seq_len: int | None = None, prefill_chunk: int | None = None,
                    moe: str = "auto", weights_format: str = "same", onnx_accuracy_level: int | None = None,
                    tp: int = 1, attention: str = "auto", moe_kernel: str = "auto", force: bool = False,
                    skip_weights: bool = False, config: DbrxConfig | None = None,
                    progress: bool = True) -> ExportReport:
    """Export the prefill and decode graphs (and weights, unless ``skip_weights``) to ``out``.

    ``dtype`` is the compute dtype; ``weights_format`` how the matrices are stored (quantize.py);
    ``onnx_accuracy_level`` (int8 only): the ONNX linear layers as MatMulNBits at that level.
    ``attention``: how the AOTInductor graphs compute attention (``auto``, ``math``, ``sdpa``;
    trace.resolve_attention); ``moe_kernel``: how they compute gathered experts (``auto``, ``inductor``,
    ``triton``; trace.resolve_moe_kernel). ``tp``: tensor-parallel degree: one package per graph for every rank,
    each rank's weights in weights/rank-R/ (dbrx_aot/tp.py).

    ``checkpoint`` is a Hugging Face DBRX directory; with ``skip_weights`` a ``config`` alone
    will do (compile-only: the result holds no weights and cannot run).
    """
    out = Path(out)
    formats = parse_formats(formats)
    if checkpoint is not None:
        config = DbrxConfig.from_file(checkpoint)
        checkpoint_shards(checkpoint)  # fail now, not after compiling, on a missing or pickled file
    elif config is None or not skip_weights:
        raise DbrxAotError("export: give a CHECKPOINT directory (or --preset with --skip-weights)")
    torch_dtype = parse_dtype(dtype)
    check_weights_format(weights_format)
    check_tp(config, tp)
    if tp > 1 and "onnx" in formats:
        raise DbrxAotError(f"--format onnx with --tp {tp}: ONNX has no collectives onnxruntime's published builds "
                           "run; export the tensor-parallel artifact with --format aoti")
    if weights_format == "bfloat16" and torch_dtype != torch.float32:
        raise DbrxAotError(f"--weights bfloat16 goes with --dtype float32 (bf16 storage, fp32 compute); with "
                           f"--dtype {dtype} use --weights same")
    if onnx_accuracy_level is not None:
        from dbrx_aot.export.onnx import ONNX_ACCURACY_LEVELS

        if weights_format != "int8" or "onnx" not in formats or torch_dtype != torch.float32:
            raise DbrxAotError("--onnx-accuracy-level goes with --weights int8, --format onnx and --dtype float32 "
                               "(it picks how the ONNX graphs multiply int8 weights)")
        if onnx_accuracy_level not in ONNX_ACCURACY_LEVELS:
            raise DbrxAotError(f"--onnx-accuracy-level {onnx_accuracy_level}: expected "
                               f"{', '.join(map(str, ONNX_ACCURACY_LEVELS))}")
    dev = resolve_device(device)
    max_seq_len = min(config.max_seq_len, 4096) if max_seq_len is None else max_seq_len
    prefill_chunk = min(max_seq_len, 64) if prefill_chunk is None else prefill_chunk
    check_static_shapes(config, batch_size, max_seq_len, prefill_chunk)

    def graph_specs(onnx: bool) -> dict[str, GraphSpec]:
        form = dict(config=config, dtype=torch_dtype, device=dev, onnx=onnx)
        return {"prefill": GraphSpec("prefill", prefill_chunk,
                                     resolve_moe_mode(moe, batch_size * prefill_chunk, **form)),
                "decode": GraphSpec("decode", 1, resolve_moe_mode(moe, batch_size, **form))}

    # Each format's graphs take the MoE form auto picks for it (ONNX has no grouped product): with
    # both formats the AOTInductor graphs may group their experts where the ONNX ones stay dense.
    # The manifest's moe_modes (the eager reference's forms) are the AOTInductor graphs' when there
    # are some; graphs[g].onnx_moe is the ONNX graph's.
    specs = graph_specs(onnx="aoti" not in formats)
    onnx_specs = graph_specs(onnx=True) if "onnx" in formats else {}
    attention_modes = {name: resolve_attention(attention, spec, dev) for name, spec in specs.items()}
    moe_kernels = {name: resolve_moe_kernel(moe_kernel, spec, dev) for name, spec in specs.items()}
    if out.exists() and not force:
        raise DbrxAotError(f"{out}: already exists (use --force to overwrite)")

    tmp = staging_dir(out)
    timings: dict[str, dict] = {}
    stages = 2 + (not skip_weights) + len(GRAPHS) * len(formats)
    bar = tqdm(total=stages, desc="export", unit="stage", disable=not progress)
    try:
        rank_weights: list[dict[str, str]] = []
        if not skip_weights:
            with stage("convert weights", timings, bar):
                rank_weights = convert_weights(checkpoint, config, torch_dtype, weights_format, tmp / WEIGHTS_DIR,
                                               progress, tp)
        weights = rank_weights[0] if rank_weights and tp == 1 else {}
        # "outputs": the in-place form (logits; the cache is updated); "onnx_outputs": the ONNX form.
        graphs = {name: io_description(config, specs[name], batch_size, max_seq_len, torch_dtype, functional=False,
                                       tp=tp)
                  for name in GRAPHS}
        with compile_world(tp) if tp > 1 else nullcontext() as tp_group:
            with stage("build empty model", timings, bar):
                model = empty_model(config, torch_dtype, dev, weights_format, tp, tp_group)
            if "aoti" in formats:
                from dbrx_aot.export.aoti import compile_package, resolve_linear

                for name in GRAPHS:
                    linear = resolve_linear(specs[name], batch_size, dev, weights_format)
                    extents = attention_extents(specs[name], dev, max_seq_len, torch_dtype)
                    with stage(f"aoti {name}: export + compile", timings, bar):
                        compile_package(model, specs[name], batch_size, max_seq_len, tmp / "aoti" / f"{name}.pt2",
                                        attention_modes[name], linear, extents, moe_kernels[name])
                    graphs[name]["aoti"] = f"aoti/{name}.pt2"
                    graphs[name]["aoti_attention"] = attention_modes[name]
                    graphs[name]["aoti_attention_extents"] = list(extents)
                    graphs[name]["aoti_linear"] = linear
                    graphs[name]["aoti_moe_kernel"] = moe_kernels[name]
                    graphs[name]["aoti_ops"] = project_ops(specs[name].moe, torch_dtype)
        if "onnx" in formats:
            from dbrx_aot.export.onnx import export_onnx

            for name in GRAPHS:
                with stage(f"onnx {name}: export", timings, bar):
                    graphs[name]["onnx"] = export_onnx(model, onnx_specs[name], batch_size, max_seq_len, tmp, weights,
                                                       onnx_accuracy_level)
                graphs[name]["onnx_moe"] = onnx_specs[name].moe
                graphs[name]["onnx_outputs"] = io_description(config, onnx_specs[name], batch_size, max_seq_len,
                                                              torch_dtype, functional=True)["outputs"]
        del model
        with stage("checksums", timings, bar):
            files = {}
            for path in sorted(p for p in tmp.rglob("*") if p.is_file()):
                rel = path.relative_to(tmp).as_posix()
                files[rel] = {"sha256": sha256_file(path), "bytes": path.stat().st_size}
        tokenizer = Tokenizer.from_checkpoint(checkpoint) if checkpoint is not None else Tokenizer()
        manifest = Manifest(
            format_version=FORMAT_VERSION, versions=versions(), device=dev.type,
            dtype=str(torch_dtype).removeprefix("torch."), batch_size=batch_size, max_seq_len=max_seq_len,
            prefill_chunk=prefill_chunk, moe=moe, moe_modes={n: specs[n].moe for n in GRAPHS}, config=config,
            formats=list(formats), graphs=graphs, weights=weights, weights_format=weights_format,
            onnx_accuracy_level=onnx_accuracy_level, tp=tp, tp_group=tp_group, attention=attention,
            moe_kernel=moe_kernel,
            rank_weights=rank_weights if tp > 1 else [],
            tokenizer={"encoding": "cl100k_base", "eos_ids": list(tokenizer.eos_ids), "pad_id": tokenizer.pad_id,
                       "bos_id": tokenizer.bos_id, "chat_template": tokenizer.chat_template},
            files=files)
        manifest.write(tmp)
        replace_dir(tmp, out)
    except OSError as err:
        shutil.rmtree(tmp, ignore_errors=True)
        reason = "disk full" if err.errno == errno.ENOSPC else err.strerror or str(err)
        raise DbrxAotError(f"{out}: export failed writing {err.filename or tmp} ({reason}); nothing was "
                           "left behind") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        bar.close()
        release_traces()
    sizes = {rel: info["bytes"] for rel, info in files.items()}
    log.info("exported %s (%s), %.1f MB", out, ", ".join(formats), sum(sizes.values()) / 1e6)
    return ExportReport(out, timings, sizes)


def convert_weights(checkpoint: Path, config: DbrxConfig, dtype: torch.dtype, weights_format: str, out: Path,
                    progress: bool, tp: int = 1) -> list[dict[str, str]]:
    """Hub checkpoint -> weights/ in the graph's names, layout and stored form (``weights_format``:
    the matrices in bf16, or int8 with their scales beside them), one tensor at a time; under
    tensor parallelism each tensor is cut into the ranks' shards as it comes (tp.shard).

    One output file per input shard (per rank, in rank-R/, when ``tp`` > 1); returns, per rank,
    {graph name: file name relative to ``out``}.
    """
    out.mkdir(parents=True)
    specs = stored_specs(config, dtype, weights_format, tp)
    graph_keys = hub_to_graph_keys(config)
    shards = checkpoint_shards(checkpoint)
    plan: list[tuple[str, list[str]]] = []
    for n, path in enumerate(shards, 1):
        with open_checked(path) as f:
            names = [graph_keys[k] for k in f.keys() if k in graph_keys]
        plan.append((f"model-{n:05d}-of-{len(shards):05d}.safetensors",
                     [s for name in names for s in stored_names(name, weights_format)]))
    folders = [""] if tp == 1 else [f"rank-{r}/" for r in range(tp)]
    for folder in folders:
        (out / folder).mkdir(exist_ok=True)
    weights: list[dict[str, str]] = [{} for _ in folders]
    source = iter_stored(checkpoint, config, dtype, weights_format, progress)  # checks every key and shape
    for file, names in plan:
        with ExitStack() as stack:
            writers = [stack.enter_context(StreamingWriter(out / folder / file, [(n, *specs[n]) for n in names]))
                       for folder in folders]
            for expected in names:
                name, tensor = next(source)
                assert name == expected, (name, expected)
                for rank, (writer, folder) in enumerate(zip(writers, folders)):
                    writer.write(name, shard(name, tensor, rank, tp, config))
                    weights[rank][name] = folder + file
    for _ in source:  # drain: raises on missing keys
        pass
    return weights


def artifact_size_report(sizes: dict[str, int]) -> str:
    return "\n".join(f"{size / 1e6:10.1f} MB  {rel}" for rel, size in sorted(sizes.items()))
