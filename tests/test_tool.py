"""The tool as a deployment engineer uses it: every command, and every hard edge through the CLI."""

from __future__ import annotations

import errno
import json
import re
import shutil

import pytest
import torch
from click.testing import CliRunner

import dbrx_aot
from conftest import copy_artifact, edit_json
from dbrx_aot.chat import Conversation
from dbrx_aot.cli import cli


def run(*args, input=None):
    return CliRunner().invoke(cli, ["--quiet", *map(str, args)], input=input)


def one_line_error(result, fragment):
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and fragment in lines[0], result.output
    assert "Traceback" not in result.output


# -- commands ----------------------------------------------------------------------------------


@pytest.mark.parametrize("runtime", ["eager", "aoti", "onnxruntime"])
def test_generate_every_runtime_same_text(artifacts, runtime):
    result = run("generate", artifacts["auto"], "--runtime", runtime, "--prompt", "Hello", "--max-new-tokens", 8)
    assert result.exit_code == 0, result.output
    expected = run("generate", artifacts["auto"], "--runtime", "eager", "--prompt", "Hello", "--max-new-tokens", 8)
    assert result.stdout == expected.stdout
    assert "tok/s" in result.stderr


def test_generate_batch_and_too_many_prompts(artifacts):
    result = run("generate", artifacts["auto"], "--prompt", "a", "--prompt", "b c", "--max-new-tokens", 3)
    assert result.exit_code == 0 and result.stdout.startswith("[0] ") and "\n[1] " in result.stdout
    one_line_error(run("generate", artifacts["auto"], "--prompt", "a", "--prompt", "b", "--prompt", "c"),
                   "3 prompts, but")


def test_prompt_longer_than_cache(artifacts):
    long = "word " * 200  # S = 64
    one_line_error(run("generate", artifacts["auto"], "--runtime", "aoti", "--prompt", long), "--truncate left")
    result = run("generate", artifacts["auto"], "--runtime", "aoti", "--prompt", long, "--truncate", "left",
                 "--max-new-tokens", 4)
    assert result.exit_code == 0, result.output


def test_verify_table_and_json(artifacts):
    result = run("verify", artifacts["auto"], "--steps", 8)
    assert result.exit_code == 0, result.output
    assert "aoti" in result.stdout and "onnxruntime" in result.stdout and "identical over 8" in result.stdout
    result = run("verify", artifacts["auto"], "--runtime", "aoti", "--steps", 4, "--json")
    data = json.loads(result.stdout)
    assert result.exit_code == 0 and data["within_tolerance"]
    (r,) = data["results"]
    assert r["runtime"] == "aoti" and r["max_abs_error"] < 1e-4 and r["top1_agreement"] == 1.0
    assert r["greedy_first_difference"] is None and r["positions"] > 4


def test_verify_fails_outside_tolerance(artifacts, tmp_path, monkeypatch):
    """A runtime whose weights differ from eager's: exit 1 and the verdict says so."""
    import dbrx_aot.verify as verify

    monkeypatch.setitem(verify.TOLERANCES, ("aoti", "float32"), verify.Tolerance(0.0, 1.0, 0.0))
    result = run("verify", artifacts["auto"], "--runtime", "aoti", "--steps", 2)
    assert result.exit_code == 1 and "OUTSIDE TOLERANCE" in result.stdout


def test_verify_prompts_file(artifacts, tmp_path):
    prompts = tmp_path / "p.txt"
    prompts.write_text("one prompt\n\nanother, longer prompt with more words\n")
    result = run("verify", artifacts["auto"], "--runtime", "onnxruntime", "--prompts", prompts, "--steps", 3,
                 "--json")
    assert result.exit_code == 0, result.output
    one_line_error(run("verify", artifacts["auto"], "--prompts", tmp_path / "absent.txt"), "absent.txt")


def test_bench_json(artifacts):
    result = run("bench", artifacts["auto"], "--prompt-len", 10, "--new-tokens", 4, "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert set(data["results"]) == {"eager", "aoti", "onnxruntime"}
    for r in data["results"].values():
        assert r["decode_tokens_per_s"] > 0 and r["prefill_tokens_per_s"] > 0
        assert 0 < r["fraction_of_bandwidth_limit"] < 2 and 0 < r["fraction_of_read_limit"] < 2
        assert r["fraction_of_read_limit"] == pytest.approx(
            r["fraction_of_bandwidth_limit"] * data["copy_bandwidth_gb_s"] / data["read_bandwidth_gb_s"])
        assert r["decode_ms_p90"] >= r["decode_ms_p50"] > 0
    assert data["copy_bandwidth_gb_s"] > 0 and data["read_bandwidth_gb_s"] > 0
    table = run("bench", artifacts["auto"], "--runtime", "eager", "--prompt-len", 8, "--new-tokens", 2)
    assert "decode tok/s" in table.stdout


def test_bench_profiles_decode_steps_after_the_timed_ones(artifacts):
    """--profile N: N more decode steps under torch.profiler, the operators (kernels on a GPU) that
    took their time, largest first, with their sum a step; the timed figures stay as they were."""
    result = run("bench", artifacts["auto"], "--runtime", "eager", "--prompt-len", 6, "--new-tokens", 3,
                 "--profile", 2, "--in-process", "--json")
    assert result.exit_code == 0, result.output
    r = json.loads(result.stdout)["results"]["eager"]
    prof = r["decode_profile"]
    rows = prof["rows"]
    assert 0 < len(rows) <= 12 and [x["ms_per_step"] for x in rows] == sorted((x["ms_per_step"] for x in rows),
                                                                             reverse=True)
    assert {"aten::mm", "aten::bmm"} & {x["name"] for x in rows} and rows[0]["calls_per_step"] >= 1
    assert prof["ms_per_step"] >= sum(x["ms_per_step"] for x in rows) * 0.999
    assert sum(x["share"] for x in rows) <= 1.0001
    table = run("bench", artifacts["auto"], "--runtime", "eager", "--prompt-len", 6, "--new-tokens", 3,
                "--profile", 2, "--in-process").stdout
    assert "eager: a decode step's operators, profiled after the timed steps:" in table and "aten::mm" in table
    plain = run("bench", artifacts["auto"], "--runtime", "eager", "--prompt-len", 4, "--new-tokens", 2, "--in-process",
                "--json")
    assert "decode_profile" not in json.loads(plain.stdout)["results"]["eager"]
    one_line_error(run("bench", artifacts["auto"], "--profile", -1), "--profile -1: expected a number of decode steps")


def test_inspect(artifacts, tmp_path):
    result = run("inspect", artifacts["auto"])
    assert result.exit_code == 0 and "loadable here" in result.stdout and "aoti         yes" in result.stdout
    art = copy_artifact(artifacts["auto"], tmp_path / "a")
    manifest = json.loads((art / "manifest.json").read_text())
    manifest["versions"]["torch"] = "2.9.1"
    (art / "manifest.json").write_text(json.dumps(manifest))
    data = json.loads(run("inspect", art, "--json").stdout)
    assert data["loadable_here"]["aoti"].startswith("built by torch 2.9.1")
    assert data["loadable_here"]["onnxruntime"] is None and data["loadable_here"]["eager"] is None


def test_chat_session(artifacts):
    result = run("chat", artifacts["auto"], "--runtime", "aoti", "--max-new-tokens", 4,
                 input="Hi there\nAnd again\n/reset\nFresh start\n/exit\n")
    assert result.exit_code == 0, result.output
    assert result.stdout.count("dbrx> ") == 3 and "(conversation reset)" in result.stderr
    assert run("chat", artifacts["auto"], input="Hi\n").exit_code == 0  # EOF ends it cleanly


def test_chat_keeps_the_cache_between_turns(artifacts):
    """Turn 2 feeds only its own tokens, and equals running the whole token history from scratch."""
    rt = dbrx_aot.load_runtime(artifacts["auto"], "eager", progress=False)
    conv = Conversation(rt, "Be brief.", max_new_tokens=5)
    conv.send("Hi")
    first_ids = rt.tokenizer.encode_chat([{"role": "system", "content": "Be brief."},
                                          {"role": "user", "content": "Hi"}])
    cached = conv.cached
    fed_history = first_ids + generate_ids(rt, first_ids)[:-1]
    assert cached == len(fed_history)
    turn = conv.turn_ids("More")
    # The reply's unfed last token (when cut at max_new_tokens) and its closing <|im_end|>, then the turn.
    assert conv.pending[-1] == 100279
    assert turn == conv.pending + rt.tokenizer.encode_with_specials(
        "\n<|im_start|>user\nMore<|im_end|>\n<|im_start|>assistant\n")
    calls = []
    original = rt.prefill
    rt.prefill = lambda *a: calls.append(a[0].shape) or original(*a)
    reply = conv.send("More")
    assert len(calls) == -(-len(turn) // rt.prefill_chunk)  # only the new turn was prefilled
    fresh = dbrx_aot.generate(rt, [fed_history + turn], max_new_tokens=5)
    assert reply == rt.tokenizer.decode([t for t in fresh[0] if t not in rt.tokenizer.eos_ids])


def generate_ids(rt, ids):
    return dbrx_aot.generate(rt, [ids], max_new_tokens=5)[0]


# -- hard edges: one line, exit code 2, nothing left behind -----------------------------------


@pytest.fixture()
def ckpt(tmp_path, tiny_checkpoint):
    return shutil.copytree(tiny_checkpoint, tmp_path / "ckpt")


def export(ckpt, out, *extra):
    return run("export", ckpt, "-o", out, "--max-seq-len", 16, "--prefill-chunk", 4, *extra)


def test_edge_nonexistent_path(tmp_path):
    one_line_error(run("generate", tmp_path / "nope", "--prompt", "x"), "nope: no such file")
    one_line_error(export(tmp_path / "nope", tmp_path / "out"), "nope")
    assert not (tmp_path / "out").exists()


def test_edge_llama_config(ckpt, tmp_path):
    (ckpt / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 4096}))
    one_line_error(export(ckpt, tmp_path / "out"), "model_type='llama', expected 'dbrx'")


def test_edge_invalid_json(ckpt, tmp_path):
    (ckpt / "config.json").write_text("{")
    one_line_error(run("generate", ckpt, "--prompt", "x"), "config.json: invalid JSON")


def test_edge_missing_shard(ckpt, tmp_path):
    (ckpt / "model-00002-of-00003.safetensors").unlink()
    one_line_error(export(ckpt, tmp_path / "out"), "model-00002-of-00003.safetensors")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("damage", ["truncate", "corrupt"])
def test_edge_damaged_safetensors(ckpt, tmp_path, damage):
    shard = ckpt / "model-00001-of-00003.safetensors"
    data = shard.read_bytes()
    shard.write_bytes(data[:1000] if damage == "truncate" else data[:8] + b"\x00" * 64 + data[72:])
    one_line_error(export(ckpt, tmp_path / "out"), "model-00001-of-00003.safetensors")
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]


@pytest.mark.parametrize("what", ["shape", "dtype"])
def test_edge_wrong_tensor(ckpt, tmp_path, what):
    from safetensors.torch import load_file, save_file
    shard = ckpt / "model-00003-of-00003.safetensors"
    tensors = load_file(str(shard))
    key = sorted(tensors)[0]
    tensors[key] = tensors[key][:1].contiguous() if what == "shape" else tensors[key].to(torch.int16)
    save_file(tensors, str(shard))
    one_line_error(run("generate", ckpt, "--prompt", "x"), f"{key} has {what}")


def test_edge_pickled_checkpoint(tmp_path, ckpt):
    for f in ckpt.glob("model*"):
        f.unlink()
    (ckpt / "pytorch_model.bin").write_bytes(b"\x80\x04.")
    one_line_error(run("generate", ckpt, "--prompt", "x"), "pickled PyTorch checkpoints are refused")


def test_edge_other_torch_checksum_format(artifacts, tmp_path):
    art = copy_artifact(artifacts["auto"], tmp_path / "a")
    edit_json(art / "manifest.json", format_version=7)
    one_line_error(run("generate", art, "--runtime", "aoti", "--prompt", "x"), "format_version=7")
    art = copy_artifact(artifacts["auto"], tmp_path / "b")
    manifest = json.loads((art / "manifest.json").read_text())
    manifest["versions"]["torch"] = other = "2.10.0+cu130" if torch.__version__ != "2.10.0+cu130" else "2.11.0"
    (art / "manifest.json").write_text(json.dumps(manifest))
    one_line_error(run("generate", art, "--runtime", "aoti", "--prompt", "x"), f"built by torch {other}")
    art = copy_artifact(artifacts["auto"], tmp_path / "c")
    with open(art / "prefill.onnx", "ab") as f:
        f.write(b"\0")
    one_line_error(run("generate", art, "--runtime", "onnxruntime", "--prompt", "x"), "prefill.onnx")


def test_edge_checksum_mismatch_and_opt_out(artifacts, tmp_path):
    art = copy_artifact(artifacts["auto"], tmp_path / "a")
    weights = sorted((art / "weights").iterdir())[-1]
    data = bytearray(weights.read_bytes())
    data[-5] ^= 0x01
    weights.write_bytes(bytes(data))
    for runtime in ("eager", "aoti", "onnxruntime"):
        one_line_error(run("generate", art, "--runtime", runtime, "--prompt", "x"), "sha256 does not match")
    result = run("--no-verify-checksums", "generate", art, "--runtime", "aoti", "--prompt", "x", "--max-new-tokens", 2)
    assert result.exit_code == 0, result.output


def test_edge_unknown_runtime_and_cuda(artifacts):
    one_line_error(run("generate", artifacts["auto"], "--runtime", "tensorrt", "--prompt", "x"),
                   "unknown runtime 'tensorrt'")
    if not torch.cuda.is_available():
        one_line_error(run("generate", artifacts["auto"], "--device", "cuda", "--prompt", "x"),
                       "CUDA is not available")
        one_line_error(run("bench", artifacts["auto"], "--device", "cuda"), "CUDA is not available")


def test_edge_dtype_the_runtime_cannot_run(artifacts, tmp_path):
    art = copy_artifact(artifacts["auto"], tmp_path / "a")
    edit_json(art / "manifest.json", dtype="bfloat16")
    one_line_error(run("generate", art, "--runtime", "onnxruntime", "--prompt", "x"),
                   "bfloat16 cannot run on onnxruntime's CPU execution provider")


def test_edge_output_exists(ckpt, tmp_path):
    (tmp_path / "out").mkdir()
    one_line_error(export(ckpt, tmp_path / "out"), "already exists (use --force")


def test_edge_disk_full_during_export(ckpt, tmp_path, monkeypatch):
    import dbrx_aot.safetensors_io as io

    real_write = io.StreamingWriter.write

    def write(self, name, tensor):
        real_write(self, name, tensor)
        raise OSError(errno.ENOSPC, "No space left on device", str(self.path))

    monkeypatch.setattr(io.StreamingWriter, "write", write)
    one_line_error(export(ckpt, tmp_path / "out"), "disk full")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_edge_ctrl_c_during_export(ckpt, tmp_path, monkeypatch):
    import dbrx_aot.export.aoti as aoti

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(aoti, "compile_package", interrupted)
    result = export(ckpt, tmp_path / "out")
    assert result.exit_code == 130 and result.output.strip() == "error: interrupted", result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_every_command_has_an_example():
    for name, command in cli.commands.items():
        assert "Example" in (command.help or ""), name


# -- what a new user hit (issue 8) -------------------------------------------------------------


@pytest.mark.parametrize("args, fragment", [
    (("--max-seq-len", 0), "--max-seq-len 0: expected a positive integer"),
    (("--prefill-chunk", 0), "--prefill-chunk 0: expected a positive integer"),
])
def test_edge_zero_shapes_refused(ckpt, tmp_path, args, fragment):
    result = run("export", ckpt, "-o", tmp_path / "out", *args)
    one_line_error(result, fragment)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


@pytest.mark.parametrize("option", ["--prompt-len", "--new-tokens"])
def test_edge_bench_zero_lengths(artifacts, option):
    one_line_error(run("bench", artifacts["auto"], option, 0), f"{option} 0: expected a positive integer")


def test_bench_runs_each_runtime_in_its_own_process_unless_told_in_process(artifacts):
    """So each runtime's RSS is its own, not what the runtimes before it left allocated; --in-process
    is the way round a measuring process that dies (the first H200 run's aoti benches did)."""
    import os

    args = ("bench", artifacts["auto"], "--runtime", "eager", "--runtime", "aoti", "--prompt-len", 4,
            "--new-tokens", 2)
    data = json.loads(run(*args, "--json").stdout)
    pids = {r["pid"] for r in data["results"].values()}
    assert len(pids) == 2 and os.getpid() not in pids and data["isolated"]
    assert all(0 < r["rss_gb_after"] <= r["rss_gb_peak"] + 0.01 for r in data["results"].values())
    here = json.loads(run(*args, "--json", "--in-process").stdout)
    assert {r["pid"] for r in here["results"].values()} == {os.getpid()} and not here["isolated"]
    assert all(r["decode_tokens_per_s"] > 0 for r in here["results"].values())
    assert "--in-process: what the runtimes before it left counts" in run(*args, "--in-process").stdout


def test_a_runtime_process_that_dies_is_named_with_its_signal_and_stack(capfd):
    """What the H200 showed: the aoti runtime's process crashed and bench said only "BrokenProcessPool".
    Now the child's Python stack is printed (faulthandler) and the error names the signal."""
    import os

    from dbrx_aot.bench import RemoteTraceback, run_isolated
    from dbrx_aot.errors import DbrxAotError

    assert run_isolated("divmod", divmod, 7, 2) == (3, 1)
    with pytest.raises(ValueError, match="invalid literal") as raised:
        run_isolated("int", int, "seven")
    assert isinstance(raised.value.__cause__, RemoteTraceback) and "Traceback" in str(raised.value.__cause__)
    with pytest.raises(DbrxAotError, match="the aoti runtime: its process died of SIGABRT before it reported"):
        run_isolated("the aoti runtime", os.abort)
    assert "Fatal Python error: Aborted" in capfd.readouterr().err


def test_generate_says_when_the_cache_is_full(artifacts):
    result = run("generate", artifacts["auto"], "--runtime", "aoti", "--prompt", "Hello", "--max-new-tokens", 100)
    assert result.exit_code == 0, result.output
    assert "KV cache of 64 positions is full" in result.stderr and "--max-seq-len" in result.stderr
    short = run("generate", artifacts["auto"], "--prompt", "Hello", "--max-new-tokens", 4)
    assert "full" not in short.stderr


def test_quick_start_cache_holds_a_chat():
    """The README's Quick start export leaves room for DBRX's default system prompt and a reply."""
    import re
    from pathlib import Path

    readme = (Path(__file__).parent.parent / "README.md").read_text()
    quick = readme.split("## Quick start", 1)[1].split("##", 1)[0]
    size = int(re.search(r"--max-seq-len (\d+)", quick).group(1))
    turn = dbrx_aot.Tokenizer().encode_chat([{"role": "user", "content": "What is DBRX?"}])
    assert size >= len(turn) + 2 * 256  # two turns of a 256-token reply


def test_chat_first_message_too_long_says_what_to_do(artifacts):
    result = run("chat", artifacts["auto"], "--max-new-tokens", 2, input="word " * 80 + "\n/exit\n")
    assert result.exit_code == 0, result.output
    (error,) = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert "this message is" in error and "shorten it" in error and "/reset" not in error


def test_chat_later_turn_too_long_suggests_reset(artifacts):
    rt = dbrx_aot.load_runtime(artifacts["auto"], "eager", progress=False)
    conv = Conversation(rt, "x", max_new_tokens=2)
    conv.send("Hi")
    with pytest.raises(dbrx_aot.DbrxAotError, match="no longer fits the cache .* /reset to start a new"):
        conv.send("word " * 40)


def test_chat_reply_interrupted_keeps_the_conversation(artifacts):
    """Ctrl-C mid-reply drops that turn only: the next turn answers as if it never happened."""
    rt = dbrx_aot.load_runtime(artifacts["auto"], "eager", progress=False)
    conv = Conversation(rt, "Be brief.", max_new_tokens=6)
    conv.send("Hi")
    state = (conv.cached, list(conv.pending), list(conv.messages))

    def ctrl_c(piece):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        conv.send("Something long to interrupt", write=ctrl_c)
    assert (conv.cached, conv.pending, conv.messages) == state
    reference = Conversation(rt, "Be brief.", max_new_tokens=6)
    reference.send("Hi")
    assert conv.send("More") == reference.send("More")


def test_chat_cli_messages_for_ctrl_c(artifacts, monkeypatch):
    import builtins

    from dbrx_aot.chat import Conversation as Conv

    def send(self, text, write=None):
        if text == "Hi":
            raise KeyboardInterrupt
        return "ok"

    monkeypatch.setattr(Conv, "send", send)
    result = run("chat", artifacts["auto"], input="Hi\nAgain\n/exit\n")
    assert result.exit_code == 0, result.output
    assert "reply interrupted: this turn was dropped; the conversation before it is kept" in result.stderr
    assert "/reset to start over" not in result.stderr

    def ctrl_c(prompt=""):
        raise KeyboardInterrupt

    monkeypatch.setattr(builtins, "input", ctrl_c)
    result = run("chat", artifacts["auto"])
    assert result.exit_code == 130 and "interrupted: chat ended" in result.stderr


def test_chat_piped_transcript_is_readable(artifacts):
    result = run("chat", artifacts["auto"], "--max-new-tokens", 3, input="Hi there\nAgain\n")
    assert result.exit_code == 0, result.output
    # Each turn on lines of its own (the random model's reply may hold newlines itself).
    assert result.stdout.startswith("you> Hi there\ndbrx> ") and "\nyou> Again\ndbrx> " in result.stdout


def test_quiet_and_debug_after_the_command(artifacts, tmp_path):
    import logging

    result = CliRunner().invoke(cli, ["random-checkpoint", str(tmp_path / "c"), "--quiet"])
    assert result.exit_code == 0 and result.stderr == "", result.output
    assert logging.getLogger("dbrx_aot").level == logging.WARNING
    result = CliRunner().invoke(cli, ["generate", str(tmp_path / "nope"), "--prompt", "x", "--debug"])
    assert isinstance(result.exception, dbrx_aot.DbrxAotError)  # --debug: the exception, not one line


def test_no_progress_bar_carriage_returns_when_not_a_terminal(tmp_path):
    result = CliRunner().invoke(cli, ["random-checkpoint", str(tmp_path / "c")])
    assert result.exit_code == 0 and "\r" not in result.stderr


def test_load_runtime_unknown_option_is_a_user_error(artifacts):
    with pytest.raises(dbrx_aot.DbrxAotError, match="aoti runtime: unknown option 'threads', expected one of"):
        dbrx_aot.load_runtime(artifacts["auto"], runtime="aoti", threads=1)


def test_checkpoint_generation_config_eos_reaches_the_runtime(ckpt, tmp_path):
    edit_json(ckpt / "generation_config.json", eos_token_id=[100279])
    rt = dbrx_aot.load_runtime(ckpt, "eager", progress=False)
    assert rt.tokenizer.eos_ids == (100279,)


def test_artifact_manifest_eos_reaches_the_runtime(artifacts, tmp_path):
    art = copy_artifact(artifacts["auto"], tmp_path / "a")
    manifest = json.loads((art / "manifest.json").read_text())
    manifest["tokenizer"]["eos_ids"] = [100279]
    (art / "manifest.json").write_text(json.dumps(manifest))
    for runtime in ("eager", "aoti"):
        assert dbrx_aot.load_runtime(art, runtime, progress=False).tokenizer.eos_ids == (100279,)


def test_conversation_send_writes_only_through_write(artifacts, capsys):
    import inspect

    rt = dbrx_aot.load_runtime(artifacts["auto"], "eager", progress=False)
    assert inspect.signature(Conversation.send).parameters["write"].default is None
    pieces = []
    reply = Conversation(rt, "x", max_new_tokens=3).send("Hi", write=pieces.append)
    assert "".join(pieces) == reply and capsys.readouterr().out == ""


def test_demo_runs_on_the_committed_reference_and_says_what_it_is():
    import subprocess
    from pathlib import Path

    root = Path(__file__).parent.parent
    plan = subprocess.run(["make", "-n", "-C", str(root), "demo"], capture_output=True, text=True).stdout
    assert "export reference/dbrx-stdlib" in plan and "trained on the Python standard library" in plan
    assert (root / "reference" / "dbrx-stdlib" / "model.safetensors").is_file()


def test_export_hides_torch_pytree_deprecation():
    import warnings

    from dbrx_aot.config import preset
    from dbrx_aot.export.trace import GraphSpec, empty_model, export_program

    model = empty_model(preset("tiny"), torch.float32, torch.device("cpu"))
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        export_program(model, GraphSpec("decode", 1, "gather"), 1, 16)
    assert not [w for w in seen if "LeafSpec" in str(w.message)]


def test_artifacts_and_checkpoints_follow_the_umask(artifacts, tiny_checkpoint):
    from dbrx_aot.staging import umask

    mode = 0o777 & ~umask()
    assert artifacts["auto"].stat().st_mode & 0o777 == mode
    assert tiny_checkpoint.stat().st_mode & 0o777 == mode


def test_killed_export_leaves_a_partial_directory_the_next_one_removes(tiny_checkpoint, tmp_path, caplog):
    """kill -9 mid-export: the staging directory stays (nothing can clean up after SIGKILL); the
    next write of the same target removes it and says so."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from dbrx_aot.staging import remove_abandoned, staging_dir

    out = tmp_path / "art"
    proc = subprocess.Popen([sys.executable, "-m", "dbrx_aot.cli", "--quiet", "export", str(tiny_checkpoint),
                             "-o", str(out), "--max-seq-len", "16", "--prefill-chunk", "4"])
    deadline = time.monotonic() + 120
    while not list(tmp_path.glob(".art.partial-*/weights")) and time.monotonic() < deadline:
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    (partial,) = tmp_path.glob(".art.partial-*")
    assert not out.exists()
    alive = tmp_path / f".art.partial-{os.getpid()}-live"  # a live writer's: never touched
    alive.mkdir()
    with caplog.at_level("WARNING", logger="dbrx_aot"):
        assert remove_abandoned(out) == [partial]
    assert not partial.exists() and alive.exists()
    assert "left by an interrupted write" in caplog.text
    assert staging_dir(out).name.startswith(f".art.partial-{os.getpid()}-")


def test_ab_bench_alternates_artifacts_in_one_process(artifacts, tiny_checkpoint, capsys):
    """scripts/ab_bench.py: the in-process A/B behind the README's before/after figures, with
    transformers on the artifact's checkpoint in the same rounds."""
    from conftest import load_script

    ab_bench = load_script("ab_bench")
    assert ab_bench.main([str(artifacts["gather"]), "--prompt-len", "11", "--new-tokens", "3", "--rounds", "2",
                          "--transformers", str(tiny_checkpoint), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    results = report["artifacts"]
    assert list(results)[0] == str(artifacts["gather"]) and list(results)[1].startswith("transformers ")
    assert report["peer"] == list(results)[1]
    for r in results.values():
        assert r["prefill_tokens_per_s"]["best"] >= r["prefill_tokens_per_s"]["median"] > 0
        assert r["decode_tokens_per_s"]["median"] > 0
    assert ab_bench.main([str(artifacts["gather"]), "--prompt-len", "11", "--new-tokens", "3", "--rounds", "1",
                          "--transformers", str(tiny_checkpoint)]) == 0
    assert re.search(r"decode [\d.]+ \([\d.]+\) tok/s; medians [\d.]+x and [\d.]+x transformers'\n",
                     capsys.readouterr().out)
    assert ab_bench.main([str(artifacts["gather"]), str(artifacts["dense"]), "--prompt-len", "8", "--new-tokens", "2"]) == 2
    assert "dense: batch 2, 64 cache slots; expected batch 1" in capsys.readouterr().err
    # --runtime twice: the same artifact's AOTInductor packages and ONNX graphs, in the same rounds.
    assert ab_bench.main([str(artifacts["gather"]), "--runtime", "aoti", "--runtime", "onnxruntime",
                          "--prompt-len", "5", "--new-tokens", "2", "--rounds", "1", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["runtimes"] == ["aoti", "onnxruntime"]
    assert list(report["artifacts"]) == [f"{artifacts['gather']} aoti", f"{artifacts['gather']} onnxruntime"]
    assert all(r["decode_tokens_per_s"]["median"] > 0 for r in report["artifacts"].values())
