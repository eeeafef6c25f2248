"""The tool as a deployment engineer uses it: every command, and every hard edge through the CLI."""

from __future__ import annotations

import errno
import json
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
        assert 0 < r["fraction_of_bandwidth_limit"] < 2
        assert r["decode_ms_p90"] >= r["decode_ms_p50"] > 0
    assert data["copy_bandwidth_gb_s"] > 0
    table = run("bench", artifacts["auto"], "--runtime", "eager", "--prompt-len", 8, "--new-tokens", 2)
    assert "decode tok/s" in table.stdout


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


def test_chat_cache_full_message(artifacts):
    rt = dbrx_aot.load_runtime(artifacts["auto"], "eager", progress=False)
    conv = Conversation(rt, "x", max_new_tokens=2)
    with pytest.raises(dbrx_aot.DbrxAotError, match="no longer fits the cache .* /reset"):
        conv.send("word " * 80)


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
    manifest["versions"]["torch"] = "2.11.0+cu130"
    (art / "manifest.json").write_text(json.dumps(manifest))
    one_line_error(run("generate", art, "--runtime", "aoti", "--prompt", "x"), "built by torch 2.11.0+cu130")
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
    one_line_error(export(ckpt, tmp_path / "out"), "interrupted")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_every_command_has_an_example():
    for name, command in cli.commands.items():
        assert "Example" in (command.help or ""), name
