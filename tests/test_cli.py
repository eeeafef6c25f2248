"""The CLI: commands end to end, and user mistakes as one line with exit code 2."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

from dbrx_aot.cli import cli


def run(*args):
    result = CliRunner().invoke(cli, ["--quiet", *map(str, args)])
    return result


def test_random_checkpoint_then_generate(tmp_path):
    out = tmp_path / "ckpt"
    result = run("random-checkpoint", out, "--preset", "tiny", "--shards", "2")
    assert result.exit_code == 0, result.output
    assert (out / "model.safetensors.index.json").is_file()
    result = run("generate", out, "--prompt", "Hello", "--max-new-tokens", "5", "--chat")
    assert result.exit_code == 0, result.output
    assert "5 tokens in" in result.stderr or "tokens in" in result.output


def one_line_error(result, fragment):
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and fragment in lines[0], result.output
    assert "Traceback" not in result.output


@pytest.mark.parametrize("args, fragment", [
    (["generate", "/nonexistent/x", "--prompt", "hi"], "/nonexistent/x: no such file"),
    (["random-checkpoint", "{tmp}/c", "--shards", "0"], "--shards=0"),
])
def test_errors_are_one_line(tmp_path, args, fragment):
    one_line_error(run(*[a.format(tmp=tmp_path) for a in args]), fragment)


def test_existing_output_needs_force(tmp_path):
    out = tmp_path / "c"
    assert run("random-checkpoint", out).exit_code == 0
    one_line_error(run("random-checkpoint", out), "already exists")
    assert run("random-checkpoint", out, "--force").exit_code == 0


def test_debug_shows_the_traceback(tmp_path):
    result = CliRunner().invoke(cli, ["--debug", "generate", str(tmp_path / "absent"), "--prompt", "x"])
    assert result.exit_code != 0 and result.exception is not None
