"""The ``dbrx-aot`` command line: each command parses its options and calls one library function.

User mistakes print one line (``error: ...``) and exit with code 2; ``--debug`` shows the traceback.
Results go to stdout, logs and progress bars to stderr.
"""

from __future__ import annotations

import functools
import logging
import os
import sys
from pathlib import Path

import click

from dbrx_aot.errors import DbrxAotError

EXIT_USAGE = 2
EXIT_INTERRUPTED = 130  # the shell's convention for a process ended by Ctrl-C (128 + SIGINT)


class Context:
    def __init__(self, debug: bool, quiet: bool, verify_checksums: bool):
        self.debug = debug
        self.quiet = quiet
        self.verify_checksums = verify_checksums


def report_error(line: str) -> None:
    """To stderr; on a follower rank (its stderr silenced, see ``cli``) to the process's own."""
    from dbrx_aot.tp import follower

    click.echo(line, file=sys.__stderr__ if follower() else None, err=True)


def rank_label() -> str:
    """`` (rank R)`` for the ranks other than 0 of a torchrun launch, where every rank reports."""
    from dbrx_aot.tp import follower

    return f" (rank {os.environ['RANK']})" if follower() else ""


def handles_errors(fn):
    """Turn DbrxAotError (and Ctrl-C) into one line on stderr and exit code 2."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        ctx = click.get_current_context().find_object(Context)
        try:
            return fn(*args, **kwargs)
        except DbrxAotError as err:
            if ctx is not None and ctx.debug:
                raise
            report_error(f"error{rank_label()}: {err}")
            sys.exit(EXIT_USAGE)
        except KeyboardInterrupt:
            if ctx is not None and ctx.debug:
                raise
            click.echo("error: interrupted", err=True)
            sys.exit(EXIT_INTERRUPTED)

    return wrapper


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--debug", is_flag=True, help="Show tracebacks instead of one-line errors.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bars.")
@click.option("--no-verify-checksums", is_flag=True,
              help="Load artifacts without hashing their files (sizes are still checked); for huge artifacts.")
@click.version_option(package_name="dbrx-aot")
@click.pass_context
def cli(ctx: click.Context, debug: bool, quiet: bool, no_verify_checksums: bool) -> None:
    """DBRX ahead of time: export a Hugging Face DBRX checkpoint to AOTInductor and ONNX, and run it."""
    from dbrx_aot.tp import follower

    if follower():  # under torchrun, rank 0 prints; the other ranks print only their errors
        quiet = True
        sys.stdout = open(os.devnull, "w")
        if not debug:
            sys.stderr = open(os.devnull, "w")
    ctx.obj = Context(debug, quiet, not no_verify_checksums)
    log = logging.getLogger("dbrx_aot")  # ours only: the libraries' INFO chatter stays off
    if not log.handlers:
        log.addHandler(TqdmHandler())
    set_quiet(quiet)


class TqdmHandler(logging.Handler):
    """Log lines written above any progress bar on screen, never into it."""

    def emit(self, record: logging.LogRecord) -> None:
        from tqdm.auto import tqdm

        try:
            tqdm.write(self.format(record), file=sys.stderr)
        except Exception:  # logging must never raise into the caller
            self.handleError(record)


def set_quiet(quiet: bool) -> None:
    logging.getLogger("dbrx_aot").setLevel(logging.WARNING if quiet else logging.INFO)


def _after_command(attr: str):
    def callback(ctx: click.Context, param: click.Parameter, value: bool) -> None:
        if value:
            setattr(ctx.find_object(Context), attr, True)
            if attr == "quiet":
                set_quiet(True)
    return callback


def common_options(fn):
    """--quiet and --debug are accepted after the command too (``dbrx-aot export ... --quiet``)."""
    fn = click.option("--quiet", "-q", is_flag=True, expose_value=False, callback=_after_command("quiet"),
                      help="No progress bars or log lines (also accepted before the command).")(fn)
    return click.option("--debug", is_flag=True, expose_value=False, callback=_after_command("debug"),
                        help="Show tracebacks instead of one-line errors.")(fn)


def progress_enabled() -> bool:
    """Progress bars: not with --quiet, and only on a terminal (piped, a bar's carriage returns run
    into the log lines; the stage log lines still show the progress)."""
    return not click.get_current_context().find_object(Context).quiet and sys.stderr.isatty()


def verify_checksums() -> bool:
    return click.get_current_context().find_object(Context).verify_checksums


@cli.command("random-checkpoint")
@click.argument("out", type=click.Path(path_type=Path))
@click.option("--preset", "preset_name", default="tiny", show_default=True,
              type=click.Choice(["tiny", "small", "dbrx-132b"]), help="Model size.")
@click.option("--seed", default=0, show_default=True, help="Seed of the random weights.")
@click.option("--shards", default=1, show_default=True, help="Number of safetensors shards.")
@click.option("--dtype", default="bfloat16", show_default=True,
              type=click.Choice(["float32", "bfloat16", "float16"]), help="Dtype stored on disk.")
@click.option("--layers", default=None, type=int, help="Only N layers at the preset's widths (a slice).")
@click.option("--force", is_flag=True, help="Overwrite OUT if it exists.")
@common_options
@handles_errors
def random_checkpoint_cmd(out: Path, preset_name: str, seed: int, shards: int, dtype: str, layers: int | None,
                          force: bool) -> None:
    """Write a random-weight DBRX checkpoint in exactly the Hugging Face hub layout.

    \b
    Example:
      dbrx-aot random-checkpoint build/tiny --preset tiny --seed 0 --shards 3
      dbrx-aot random-checkpoint build/132b-2 --preset dbrx-132b --layers 2 --shards 4
    """
    from dbrx_aot.checkpoint import write_random_checkpoint
    from dbrx_aot.config import parse_dtype, preset

    path = write_random_checkpoint(out, preset(preset_name, layers), seed=seed, shards=shards, dtype=parse_dtype(dtype),
                                   force=force, progress=progress_enabled())
    click.echo(str(path))


RUNTIME_OPTION = click.option("--runtime", default="eager", show_default=True,
                              help="eager, aoti, onnxruntime, or an installed plugin's name.")
DEVICE_OPTION = click.option("--device", default="cpu", show_default=True, help="cpu, cuda or cuda:N.")


@cli.command("generate")
@click.argument("path", type=click.Path(path_type=Path))
@RUNTIME_OPTION
@DEVICE_OPTION
@click.option("--prompt", "prompts", required=True, multiple=True,
              help="The prompt text; repeat for a batch (up to the artifact's batch size).")
@click.option("--chat", is_flag=True, help="Wrap the prompt in the chat template (as the user's turn).")
@click.option("--system", default=None, help="System prompt for --chat (default: DBRX's own).")
@click.option("--max-new-tokens", default=64, show_default=True)
@click.option("--temperature", default=0.0, show_default=True, help="0 is greedy.")
@click.option("--top-k", default=None, type=int)
@click.option("--top-p", default=None, type=float)
@click.option("--seed", default=None, type=int)
@click.option("--truncate", type=click.Choice(["error", "left"]), default="error", show_default=True,
              help="A prompt longer than the cache: fail, or keep its last tokens.")
@common_options
@handles_errors
def generate_cmd(path: Path, runtime: str, device: str, prompts: tuple[str, ...], chat: bool, system: str | None,
                 max_new_tokens: int, temperature: float, top_k: int | None, top_p: float | None,
                 seed: int | None, truncate: str) -> None:
    """Generate text from a prompt, streaming it to stdout; tokens/s go to stderr.

    PATH is an artifact directory (any runtime) or a Hugging Face checkpoint (eager).

    \b
    Example:
      dbrx-aot generate build/artifact --runtime aoti --prompt "Hello" --max-new-tokens 32
    """
    from dbrx_aot.app import cache_full_note, generate_text

    stats = generate_text(path, runtime=runtime, device=device, prompts=list(prompts), chat=chat, system=system,
                          max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                          seed=seed, truncate=truncate, write=lambda s: click.echo(s, nl=False),
                          verify_checksums=verify_checksums(), progress=progress_enabled())
    click.echo("")
    click.echo(f"{stats['new_tokens']} tokens in {stats['seconds']:.2f} s ({stats['tokens_per_s']:.1f} tok/s, "
               f"{runtime} on {device})", err=True)
    full = [n for n, reason in enumerate(stats["finish_reasons"]) if reason == "cache"]
    if full:
        click.echo(cache_full_note(full, len(prompts), stats["max_seq_len"]), err=True)


@cli.command("export")
@click.argument("checkpoint", required=False, type=click.Path(path_type=Path))
@click.option("-o", "--output", "out", required=True, type=click.Path(path_type=Path),
              help="The artifact directory to write.")
@click.option("--format", "formats", default="aoti", show_default=True, help="aoti, onnx, or aoti,onnx.")
@DEVICE_OPTION
@click.option("--dtype", default="float32", show_default=True, type=click.Choice(["float32", "bfloat16", "float16"]),
              help="The compute dtype.")
@click.option("--weights", "weights_format", default="same", show_default=True,
              type=click.Choice(["same", "bfloat16", "int8"]),
              help="How the matrices are stored and read: as --dtype, bf16 (with --dtype float32: the CPU "
                   "fast path, exact to the released bf16 weights), or int8 per output channel.")
@click.option("--onnx-accuracy-level", default=None, type=click.Choice(["4"]),
              help="With --weights int8: the ONNX linear layers as onnxruntime's MatMulNBits with int8 "
                   "activations (faster on CPU, not exact: its own tolerance row) [default: dequantised, exact].")
@click.option("--batch-size", default=1, show_default=True, help="B: rows per call (static).")
@click.option("--max-seq-len", default=None, type=int, help="S: cache slots per row [default: min(model, 4096)].")
@click.option("--prefill-chunk", default=None, type=int, help="P: tokens per prefill call [default: min(S, 64)].")
@click.option("--moe", default="auto", show_default=True, type=click.Choice(["auto", "dense", "gather", "grouped"]),
              help="auto: gather for decode when B*top_k < experts; otherwise grouped (on CPU, "
                   "AOTInductor only, from 16 token slots an expert in fp32, 128 in bf16), dense elsewhere.")
@click.option("--force", is_flag=True, help="Overwrite the output directory.")
@click.option("--skip-weights", is_flag=True, help="Compile only: no weights (the artifact cannot run).")
@click.option("--preset", "preset_name", default=None, type=click.Choice(["tiny", "small", "dbrx-132b"]),
              help="With --skip-weights and no CHECKPOINT: compile this configuration.")
@click.option("--layers", default=None, type=int, help="With --preset: only N layers at its widths (a slice).")
@click.option("--attention", default="auto", show_default=True, type=click.Choice(["auto", "math", "sdpa"]),
              help="How the AOTInductor graphs compute attention: written out (math) or scaled_dot_product_attention "
                   "(sdpa); auto: sdpa for CPU prefill (measured faster), math elsewhere.")
@click.option("--moe-kernel", default="auto", show_default=True, type=click.Choice(["auto", "inductor", "triton"]),
              help="How the AOTInductor decode graph computes the gathered experts: PyTorch ops compiled by "
                   "Inductor, or hand-written Triton kernels (CUDA only); auto: inductor.")
@click.option("--tp", default=1, show_default=True,
              help="Tensor-parallel degree: one package for N ranks, each rank's weight shard in weights/rank-R/ "
                   "(run with torchrun --nproc-per-node N; aoti only).")
@common_options
@handles_errors
def export_cmd(checkpoint: Path | None, out: Path, formats: str, device: str, dtype: str, weights_format: str,
               onnx_accuracy_level: str | None, batch_size: int, max_seq_len: int | None, prefill_chunk: int | None,
               moe: str, force: bool, skip_weights: bool, preset_name: str | None, layers: int | None,
               attention: str, moe_kernel: str, tp: int) -> None:
    """Export a Hugging Face DBRX checkpoint to an artifact directory (AOTInductor and/or ONNX).

    \b
    Examples:
      dbrx-aot export build/tiny -o build/artifact --format aoti,onnx --max-seq-len 2048 --prefill-chunk 64
      dbrx-aot export build/tiny -o build/artifact-int8 --format aoti,onnx --weights int8
      dbrx-aot export --preset dbrx-132b --skip-weights -o build/132b-graphs --dtype bfloat16
      dbrx-aot export --preset dbrx-132b --layers 2 --skip-weights -o build/132b-2 --dtype bfloat16 --device cuda
      dbrx-aot export build/tiny -o build/artifact-tp2 --tp 2   # then: torchrun --nproc-per-node 2 -m dbrx_aot ...
    """
    from dbrx_aot.config import preset
    from dbrx_aot.export import export_artifact
    from dbrx_aot.export.artifact import artifact_size_report

    if checkpoint is None and preset_name is None:
        raise DbrxAotError("export: give a CHECKPOINT directory, or --preset NAME with --skip-weights")
    if checkpoint is not None and preset_name is not None:
        raise DbrxAotError("export: give a CHECKPOINT or --preset, not both")
    if layers is not None and preset_name is None:
        raise DbrxAotError("export: --layers goes with --preset (a checkpoint's config.json fixes its layers)")
    report = export_artifact(checkpoint, out, formats=formats, device=device, dtype=dtype,
                             weights_format=weights_format, batch_size=batch_size,
                             onnx_accuracy_level=None if onnx_accuracy_level is None else int(onnx_accuracy_level),
                             max_seq_len=max_seq_len, prefill_chunk=prefill_chunk, moe=moe, attention=attention,
                             moe_kernel=moe_kernel, tp=tp, force=force,
                             skip_weights=skip_weights, config=preset(preset_name, layers) if preset_name else None,
                             progress=progress_enabled())
    click.echo(artifact_size_report(report.sizes))
    click.echo(str(report.path))

@cli.command("chat")
@click.argument("path", type=click.Path(path_type=Path))
@RUNTIME_OPTION
@DEVICE_OPTION
@click.option("--system", default=None, help="System prompt (default: DBRX's own, from the chat template).")
@click.option("--max-new-tokens", default=256, show_default=True)
@click.option("--temperature", default=0.0, show_default=True)
@click.option("--top-k", default=None, type=int)
@click.option("--top-p", default=None, type=float)
@click.option("--seed", default=None, type=int)
@common_options
@handles_errors
def chat_cmd(path: Path, runtime: str, device: str, system: str | None, max_new_tokens: int, temperature: float,
             top_k: int | None, top_p: float | None, seed: int | None) -> None:
    """An interactive conversation; the KV cache is kept between turns.

    Type a message and press Enter. /reset starts over, /exit (or Ctrl-D) leaves.

    \b
    Example:
      dbrx-aot chat build/artifact --runtime aoti --system "Be brief."
    """
    from dbrx_aot.app import checksum_option
    from dbrx_aot.chat import Conversation
    from dbrx_aot.runtimes import load_runtime
    from dbrx_aot.tp import from_leader

    rt = load_runtime(path, runtime=runtime, device=device, progress=progress_enabled(),
                      **checksum_option(verify_checksums()))
    conv = Conversation(rt, system, max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
                        top_p=top_p, seed=seed)
    interactive = sys.stdin.isatty()
    click.echo(f"dbrx-aot chat ({runtime} on {device}, cache {rt.max_seq_len} tokens). /reset, /exit.", err=True)
    def read_line() -> str | None:  # None: end of input
        try:
            return input("you> " if interactive else "")
        except EOFError:
            return None

    while True:
        try:
            line = from_leader(read_line)  # under torchrun, rank 0 reads and every rank gets the line
        except KeyboardInterrupt:
            click.echo("\ninterrupted: chat ended (/exit or Ctrl-D leave without an error)", err=True)
            sys.exit(EXIT_INTERRUPTED)
        if line is None:
            click.echo("", err=True)
            return
        text = line.strip()
        if not interactive:  # piped input is not echoed by a terminal: keep the transcript readable
            click.echo(f"you> {line}")
        if text == "/exit":
            return
        if text == "/reset":
            conv.reset()
            click.echo("(conversation reset)", err=True)
            continue
        if not text:
            continue
        click.echo("dbrx> ", nl=False)
        try:
            conv.send(text, write=lambda piece: click.echo(piece, nl=False))
        except KeyboardInterrupt:
            click.echo("")
            click.echo("(reply interrupted: this turn was dropped; the conversation before it is kept)", err=True)
            continue
        except DbrxAotError as err:
            click.echo("")
            click.echo(f"error: {err}", err=True)
            continue
        click.echo("")
        if conv.finish_reason == "cache":
            click.echo(f"(the reply was cut: the cache of {rt.max_seq_len} tokens is full; /reset to start a new "
                       "conversation, or export with a larger --max-seq-len)", err=True)
        click.echo(f"[{conv.tokens_used}/{rt.max_seq_len} tokens]", err=True)


@cli.command("serve")
@click.argument("path", type=click.Path(path_type=Path))
@RUNTIME_OPTION
@DEVICE_OPTION
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--port", default=8000, show_default=True, help="Port to listen on (0: any free port).")
@click.option("--max-queue", default=64, show_default=True,
              help="Requests that may wait for a free row; beyond them the server answers 429.")
@click.option("--grace", default=30.0, show_default=True,
              help="Seconds SIGTERM / Ctrl-C lets in-flight requests finish before cancelling them.")
@click.option("--model-name", default=None, help="The model id clients send [default: PATH's directory name].")
@common_options
@handles_errors
def serve_cmd(path: Path, runtime: str, device: str, host: str, port: int, max_queue: int, grace: float,
              model_name: str | None) -> None:
    """Serve the OpenAI API (chat and completions, streaming or not) with continuous batching.

    Each of the artifact's B rows is a slot: requests take a free row, wait in a FIFO queue when
    none is, and free it when done. The ready line (with the URL) goes to stdout.

    \b
    Example:
      dbrx-aot serve build/artifact --runtime aoti --port 8000 --max-queue 32
    """
    from dbrx_aot.server import serve
    from dbrx_aot.tp import launched_by_torchrun

    if launched_by_torchrun():
        raise DbrxAotError("serve runs in one process: tensor-parallel serving (under torchrun) is not supported "
                           "yet; serve a single-process artifact")
    serve(path, runtime=runtime, device=device, host=host, port=port, max_queue=max_queue, grace=grace,
          model_name=model_name, verify_checksums=verify_checksums(), progress=progress_enabled(),
          ready=lambda line: click.echo(line))


@cli.command("verify")
@click.argument("path", type=click.Path(path_type=Path))
@click.option("--runtime", "runtimes", multiple=True, default=["all"], show_default=True,
              help="Runtime(s) to compare with eager; repeatable; all = every format the artifact holds.")
@DEVICE_OPTION
@click.option("--prompts", "prompts_file", default=None, type=click.Path(path_type=Path),
              help="A text file, one prompt per line (default: a built-in varied set).")
@click.option("--steps", default=32, show_default=True, help="Decode steps compared after each prompt.")
@click.option("--reference", default=None, type=click.Path(path_type=Path),
              help="The original checkpoint: with --text, also measure held-out perplexity against it.")
@click.option("--text", "texts", multiple=True, type=click.Path(path_type=Path),
              help="Held-out text file(s) for --reference; repeatable.")
@click.option("--max-perplexity-increase", default=None, type=float, metavar="FRACTION",
              help="With --reference: exit 1 when a runtime's perplexity exceeds the reference's by more "
                   "(0.01 = 1%%).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of the table.")
@common_options
@handles_errors
def verify_cmd(path: Path, runtimes: tuple[str, ...], device: str, prompts_file: Path | None, steps: int,
               reference: Path | None, texts: tuple[Path, ...], max_perplexity_increase: float | None,
               as_json: bool) -> None:
    """Compare every runtime of an artifact with the eager model; exit 1 outside the tolerance table.

    With --reference and --text, also score held-out text: each runtime's perplexity next to the
    original checkpoint's (the quality of int8 or bf16 weights, not only their equivalence).

    \b
    Examples:
      dbrx-aot verify build/artifact --runtime all --steps 32
      dbrx-aot verify build/ref-int8 --reference reference/dbrx-stdlib --text held-out.py
    """
    import dataclasses
    import json

    from dbrx_aot.verify import format_table, to_json, verify

    if bool(reference) != bool(texts):
        raise DbrxAotError("verify: --reference and --text go together (the original checkpoint, and the "
                           "held-out text to score)")
    if max_perplexity_increase is not None and reference is None:
        raise DbrxAotError("verify: --max-perplexity-increase needs --reference and --text")

    prompts = None
    if prompts_file is not None:
        try:
            prompts = [line for line in prompts_file.read_text().splitlines() if line.strip()]
        except OSError as err:
            raise DbrxAotError(f"--prompts {prompts_file}: {err.strerror}") from None
        if not prompts:
            raise DbrxAotError(f"--prompts {prompts_file}: no prompts (one per line expected)")
    names = None if "all" in runtimes else list(runtimes)
    result = verify(path, names, prompts, steps, device=device, verify_checksums=verify_checksums(),
                    progress=progress_enabled())
    quality = None
    if reference is not None:
        from dbrx_aot.quality import format_quality, held_out_quality

        quality = held_out_quality(path, reference, list(texts), names, device=device,
                                   verify_checksums=verify_checksums(), progress=progress_enabled())
    if as_json:
        data = to_json(result)
        if quality is not None:
            data["quality"] = dataclasses.asdict(quality)
        click.echo(json.dumps(data, indent=2))
    else:
        click.echo(format_table(result))
        if quality is not None:
            click.echo(format_quality(quality, result.dtype))
    too_far = (quality is not None and max_perplexity_increase is not None
               and quality.worst_change() > max_perplexity_increase)
    if too_far:
        click.echo(f"perplexity {quality.worst_change():+.2%} vs the reference: more than "
                   f"--max-perplexity-increase {max_perplexity_increase:g}", err=True)
    if not result.within_tolerance or too_far:
        sys.exit(1)


@cli.command("bench")
@click.argument("path", type=click.Path(path_type=Path))
@click.option("--runtime", "runtimes", multiple=True, default=["all"], show_default=True,
              help="Runtime(s) to measure; repeatable; all = eager + every format the artifact holds.")
@DEVICE_OPTION
@click.option("--prompt-len", default=64, show_default=True, help="Prompt tokens per row (prefill).")
@click.option("--new-tokens", default=32, show_default=True, help="Decode steps timed.")
@click.option("--cuda-graphs/--no-cuda-graphs", default=None,
              help="aoti decode through CUDA graphs [default: on for CUDA, off for CPU].")
@click.option("--random-weights", default=None, type=int, metavar="SEED",
              help="aoti only: bind random weights made on the device (compile-only artifacts at real width).")
@click.option("--in-process", is_flag=True,
              help="Measure in this process, not in a fresh process per runtime (then a runtime's memory "
                   "figures include what the runtimes before it left).")
@click.option("--profile", "profile_steps", default=0, show_default=True, metavar="STEPS",
              help="After the timed steps, profile this many decode steps: the kernels (on CPU, the operators) "
                   "that take a step's time.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of the table.")
@common_options
@handles_errors
def bench_cmd(path: Path, runtimes: tuple[str, ...], device: str, prompt_len: int, new_tokens: int,
              cuda_graphs: bool | None, random_weights: int | None, in_process: bool, profile_steps: int,
              as_json: bool) -> None:
    """Prefill and decode speed of each runtime in one run, vs eager and vs the memory-bandwidth limit.

    \b
    Example:
      dbrx-aot bench build/small-artifact --prompt-len 128 --new-tokens 64 --json
      dbrx-aot bench build/132b-2 --device cuda --random-weights 0 --prompt-len 512
    """
    import json

    from dbrx_aot.bench import bench, format_table
    from dbrx_aot.manifest import Manifest
    from dbrx_aot.verify import artifact_runtimes

    names = list(runtimes)
    if "all" in names:
        names = ["aoti"] if random_weights is not None else ["eager"] + artifact_runtimes(Manifest.read(path).formats)
    report = bench(path, names, device=device, prompt_len=prompt_len, new_tokens=new_tokens,
                   verify_checksums=verify_checksums(), progress=progress_enabled(), cuda_graphs=cuda_graphs,
                   random_weights=random_weights, isolate=not in_process, profile_steps=profile_steps)
    click.echo(json.dumps(report, indent=2) if as_json else format_table(report))


@cli.command("inspect")
@click.argument("path", required=False, type=click.Path(path_type=Path))
@click.option("--preset", "preset_name", default=None, type=click.Choice(["tiny", "small", "dbrx-132b"]),
              help="Instead of an artifact: the memory plan of this configuration in every weight format, on "
                   "one GPU and per rank at TP 2, 4 and 8.")
@click.option("--dtype", default="bfloat16", show_default=True, type=click.Choice(["float32", "bfloat16", "float16"]),
              help="With --preset: the compute dtype (the KV cache's).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of text.")
@common_options
@handles_errors
def inspect_cmd(path: Path | None, preset_name: str | None, dtype: str, as_json: bool) -> None:
    """What an artifact holds, and whether this environment can load it (and if not, why); or, with
    --preset, the memory plan: bytes per component in each weight format and the KV cache an H100
    or H200 has left beside the weights.

    \b
    Examples:
      dbrx-aot inspect build/artifact
      dbrx-aot inspect --preset dbrx-132b --dtype bfloat16
    """
    import json

    from dbrx_aot.config import preset
    from dbrx_aot.inspection import describe, format_plan, format_text, preset_plans

    if (path is None) == (preset_name is None):
        raise DbrxAotError("inspect: give an artifact PATH or --preset NAME (one of them)")
    if preset_name is not None:
        config = preset(preset_name)
        plans = preset_plans(config, dtype)
        click.echo(json.dumps(plans, indent=2) if as_json else format_plan(config, plans))
        return
    info = describe(path)
    click.echo(json.dumps(info, indent=2) if as_json else format_text(info))


def main() -> None:
    cli(prog_name="dbrx-aot")


if __name__ == "__main__":
    main()
