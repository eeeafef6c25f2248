"""The real-width slice: a preset's widths with fewer layers, and random weights made on a device."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner

from dbrx_aot.checkpoint import graph_shapes, iter_checkpoint, random_weights
from dbrx_aot.cli import cli
from dbrx_aot.config import DbrxConfig, preset
from dbrx_aot.errors import DbrxAotError


def test_a_slice_keeps_the_released_widths():
    full, two = preset("dbrx-132b"), preset("dbrx-132b", 2)
    assert two.n_layers == 2 and dataclass_without_layers(two) == dataclass_without_layers(full)
    shapes = graph_shapes(two)
    assert shapes["blocks.1.ffn.w1"] == (16, 10752, 6144) and "blocks.2.ffn.w1" not in shapes
    assert preset("small", None) == preset("small")
    for bad in (0, 41, -1):
        with pytest.raises(DbrxAotError, match=f"--layers {bad}: expected 1 to 40"):
            preset("dbrx-132b", bad)


def dataclass_without_layers(config: DbrxConfig) -> dict:
    return {k: v for k, v in config.to_dict().items() if k != "n_layers"}


def test_random_checkpoint_layers_option(tmp_path):
    out = tmp_path / "slice"
    result = CliRunner().invoke(cli, ["--quiet", "random-checkpoint", str(out), "--preset", "tiny", "--layers", "1"])
    assert result.exit_code == 0, result.output
    config = json.loads((out / "config.json").read_text())
    assert config["n_layers"] == 1 and config["d_model"] == 64
    names = [name for name, _ in iter_checkpoint(out, DbrxConfig.from_file(out), torch.float32, progress=False)]
    assert "blocks.0.ffn.w1" in names and not any(n.startswith("blocks.1.") for n in names)
    result = CliRunner().invoke(cli, ["random-checkpoint", str(tmp_path / "x"), "--preset", "tiny", "--layers", "3"])
    assert result.exit_code == 2 and "--layers 3: expected 1 to 2" in result.output


def test_export_layers_goes_with_preset(tmp_path, tiny_checkpoint):
    result = CliRunner().invoke(cli, ["export", str(tiny_checkpoint), "-o", str(tmp_path / "a"), "--layers", "1"])
    assert result.exit_code == 2 and "--layers goes with --preset" in result.output


def test_random_weights_match_the_graph_and_the_checkpoint_scales(tiny_checkpoint):
    config = preset("tiny")
    made = dict(random_weights(config, torch.bfloat16, "cpu", seed=3))
    assert {k: tuple(v.shape) for k, v in made.items()} == graph_shapes(config)
    assert all(v.dtype == torch.bfloat16 and v.device.type == "cpu" for v in made.values())
    assert all(torch.equal(made[k], v) for k, v in random_weights(config, torch.bfloat16, "cpu", seed=3))
    disk = dict(iter_checkpoint(tiny_checkpoint, config, torch.float32, progress=False))
    for key in ("blocks.0.ffn.w2", "blocks.1.attn.Wqkv.weight", "norm_f.weight", "wte.weight"):
        a, b = made[key].float(), disk[key]
        assert a.mean().item() == pytest.approx(b.mean().item(), abs=0.05)
        if a.numel() > 1000:  # a std of 64 samples (norm_f) is too loose to compare
            assert a.std().item() == pytest.approx(b.std().item(), rel=0.1), key
