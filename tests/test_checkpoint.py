"""Config reading and checkpoint I/O: round trip, the hub layout, and every bad-input error."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors import safe_open

from conftest import edit_json, make_checkpoint, parity_config
from dbrx_aot.checkpoint import (
    INDEX_FILE, checkpoint_shards, hub_shapes, iter_checkpoint, load_model, write_random_checkpoint,
)
from dbrx_aot.config import PRESETS, DbrxConfig
from dbrx_aot.errors import DbrxAotError

RELEASED_CONFIG = {  # dbrx-instruct's config.json, as published
    "architectures": ["DbrxForCausalLM"],
    "attn_config": {"clip_qkv": 8, "kv_n_heads": 8, "model_type": "", "rope_theta": 500000},
    "d_model": 6144, "emb_pdrop": 0.0,
    "ffn_config": {"ffn_hidden_size": 10752, "model_type": "", "moe_jitter_eps": 0, "moe_loss_weight": 0.05,
                   "moe_num_experts": 16, "moe_top_k": 4},
    "initializer_range": 0.02, "max_seq_len": 32768, "model_type": "dbrx", "n_heads": 48, "n_layers": 40,
    "output_router_logits": False, "resid_pdrop": 0.0, "router_aux_loss_coef": 0.05,
    "tie_word_embeddings": False, "torch_dtype": "bfloat16", "transformers_version": "4.38.2",
    "use_cache": True, "vocab_size": 100352,
}


# -- config ------------------------------------------------------------------------------------


def test_released_config_reads_as_the_132b_preset():
    config = DbrxConfig.from_dict(RELEASED_CONFIG)
    assert config == PRESETS["dbrx-132b"]
    assert config.param_count() == 131_596_523_520
    assert config.head_dim == 128


def test_transformers5_form_with_rope_parameters_and_bookkeeping_keys():
    data = json.loads(json.dumps(RELEASED_CONFIG))
    del data["attn_config"]["rope_theta"]
    data["rope_parameters"] = {"rope_type": "default", "rope_theta": 500000.0}
    data["attn_config"].update({"id2label": {"0": "LABEL_0"}, "return_dict": True, "attn_pdrop": 0.0})
    data["ffn_config"].update({"_name_or_path": "", "ffn_act_fn": {"name": "silu"}})
    data.update({"dtype": "bfloat16", "return_dict": True, "_name_or_path": "x"})
    assert DbrxConfig.from_dict(data) == PRESETS["dbrx-132b"]


def test_hub_rope_theta_wins_over_transformers_default():
    data = json.loads(json.dumps(RELEASED_CONFIG))
    data["rope_parameters"] = {"rope_type": "default", "rope_theta": 10000.0}
    assert DbrxConfig.from_dict(data).rope_theta == 500000.0


def test_dbrx_base_jitter_is_accepted():
    data = json.loads(json.dumps(RELEASED_CONFIG))
    data["ffn_config"]["moe_jitter_eps"] = 0.01  # dbrx-base: training-only, ignored at inference
    assert DbrxConfig.from_dict(data) == PRESETS["dbrx-132b"]


@pytest.mark.parametrize("change, message", [
    (lambda d: d.update(model_type="llama"), "model_type='llama'"),
    (lambda d: d.update(n_heads=7), "n_heads=7"),
    (lambda d: d["attn_config"].update(kv_n_heads=5), "kv_n_heads=5"),
    (lambda d: d["ffn_config"].update(moe_top_k=17), "moe_top_k=17"),
    (lambda d: d["ffn_config"].update(ffn_act_fn={"name": "gelu"}), "ffn_act_fn"),
    (lambda d: d.update(tie_word_embeddings=True), "tie_word_embeddings"),
    (lambda d: d.pop("d_model"), "missing key d_model"),
    (lambda d: d.update(rope_parameters={"rope_type": "yarn", "factor": 4}), "rope_type='yarn'"),
])
def test_config_errors_name_the_key(tmp_path, change, message):
    data = json.loads(json.dumps(RELEASED_CONFIG))
    change(data)
    path = tmp_path / "config.json"
    path.write_text(json.dumps(data))
    with pytest.raises(DbrxAotError, match=message) as err:
        DbrxConfig.from_file(tmp_path)
    assert str(path) in str(err.value)


def test_invalid_json_config(tmp_path):
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(DbrxAotError, match="invalid JSON"):
        DbrxConfig.from_file(tmp_path)


# -- checkpoints -------------------------------------------------------------------------------


@pytest.fixture()
def ckpt(tmp_path):
    return make_checkpoint(tmp_path / "ckpt", parity_config("base"), shards=3)


def test_round_trip_same_tensors(ckpt):
    config = parity_config("base")
    on_disk = {}
    for shard in checkpoint_shards(ckpt):
        with safe_open(str(shard), "pt") as f:
            on_disk.update({k: f.get_tensor(k) for k in f.keys()})
    assert set(on_disk) == set(hub_shapes(config))
    model = load_model(ckpt, config, torch.float32, "cpu", progress=False)
    params = dict(model.named_parameters())
    E, F, D = config.moe_num_experts, config.ffn_hidden_size, config.d_model
    assert torch.equal(params["blocks.1.ffn.w2"], on_disk["transformer.blocks.1.ffn.experts.mlp.w2"].view(E, F, D))
    assert torch.equal(params["blocks.0.attn.Wqkv.weight"],
                       on_disk["transformer.blocks.0.norm_attn_norm.attn.Wqkv.weight"])
    assert torch.equal(params["lm_head.weight"], on_disk["lm_head.weight"])
    assert not torch.equal(params["lm_head.weight"], params["wte.weight"])


def test_hub_layout_files(ckpt):
    names = sorted(p.name for p in ckpt.iterdir())
    assert names == sorted(["config.json", "generation_config.json", INDEX_FILE, "tokenizer_config.json",
                            "model-00001-of-00003.safetensors", "model-00002-of-00003.safetensors",
                            "model-00003-of-00003.safetensors"])
    assert json.loads((ckpt / "generation_config.json").read_text())["eos_token_id"] == [100257, 100279]


def test_random_checkpoint_is_deterministic_and_bf16_by_default(tmp_path):
    config = parity_config("base")
    a = write_random_checkpoint(tmp_path / "a", config, seed=3, progress=False)
    b = write_random_checkpoint(tmp_path / "b", config, seed=3, progress=False)
    assert (a / "model.safetensors").read_bytes() == (b / "model.safetensors").read_bytes()
    with safe_open(str(a / "model.safetensors"), "pt") as f:
        assert f.get_tensor("lm_head.weight").dtype == torch.bfloat16
    with pytest.raises(DbrxAotError, match="already exists"):
        write_random_checkpoint(a, config, progress=False)


def consume(path):
    for _ in iter_checkpoint(path, DbrxConfig.from_file(path), torch.float32, progress=False):
        pass


def rewrite_shard(path, shard_name, edit):
    """Rewrite one shard's tensors through ``edit(dict)``, keeping the index in step."""
    from safetensors.torch import save_file
    shard = path / shard_name
    with safe_open(str(shard), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    edit(tensors)
    save_file(tensors, str(shard))


def first_shard_key(path):
    index = json.loads((path / INDEX_FILE).read_text())["weight_map"]
    key = sorted(index)[0]
    return key, index[key]


def test_missing_key(ckpt):
    key, shard = first_shard_key(ckpt)
    rewrite_shard(ckpt, shard, lambda t: t.pop(key))
    with pytest.raises(DbrxAotError, match=f"missing key {key}"):
        consume(ckpt)


def test_unexpected_key(ckpt):
    _, shard = first_shard_key(ckpt)
    rewrite_shard(ckpt, shard, lambda t: t.update({"transformer.blocks.9.ffn.router.layer.weight": torch.zeros(2)}))
    with pytest.raises(DbrxAotError, match=f"{shard}: unexpected key transformer.blocks.9"):
        consume(ckpt)


def test_wrong_shape(ckpt):
    key, shard = first_shard_key(ckpt)
    rewrite_shard(ckpt, shard, lambda t: t.update({key: t[key][..., :-1].contiguous()}))
    with pytest.raises(DbrxAotError, match=f"{key} has shape .* expected"):
        consume(ckpt)


def test_wrong_dtype(ckpt):
    key, shard = first_shard_key(ckpt)
    rewrite_shard(ckpt, shard, lambda t: t.update({key: t[key].to(torch.int32)}))
    with pytest.raises(DbrxAotError, match=f"{key} has dtype torch.int32"):
        consume(ckpt)


def test_missing_shard(ckpt):
    (ckpt / "model-00002-of-00003.safetensors").unlink()
    with pytest.raises(DbrxAotError, match="shard model-00002-of-00003.safetensors .* is missing"):
        consume(ckpt)


@pytest.mark.parametrize("damage", ["truncate", "header"])
def test_truncated_or_corrupt_file(ckpt, damage):
    shard = ckpt / "model-00001-of-00003.safetensors"
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2] if damage == "truncate" else b"\xff" * 16 + data[16:])
    with pytest.raises(DbrxAotError, match="model-00001-of-00003.safetensors"):
        consume(ckpt)


def test_pickled_checkpoint_refused(tmp_path):
    ckpt = tmp_path / "bin"
    ckpt.mkdir()
    (ckpt / "config.json").write_text(json.dumps(parity_config("base").to_hf_dict()))
    (ckpt / "pytorch_model.bin").write_bytes(b"\x80\x04not loaded")
    with pytest.raises(DbrxAotError, match="pytorch_model.bin: pickled PyTorch checkpoints are refused"):
        consume(ckpt)


def test_empty_directory(tmp_path):
    with pytest.raises(DbrxAotError, match="no model.safetensors"):
        checkpoint_shards(tmp_path)


def test_config_not_matching_weights(ckpt):
    edit_json(ckpt / "config.json", n_layers=3)
    with pytest.raises(DbrxAotError, match="missing key transformer.blocks.2"):
        consume(ckpt)


def test_transformers_5_saved_checkpoint_loads(tmp_path, ckpt):
    """A checkpoint saved by transformers 5 (rope_parameters, bookkeeping keys) reads the same."""
    transformers = pytest.importorskip("transformers")
    data = json.loads((ckpt / "config.json").read_text())
    model = transformers.DbrxForCausalLM.from_pretrained(ckpt, dtype=torch.float32)
    assert model.config.rope_parameters["rope_theta"] == data["attn_config"]["rope_theta"]
    out = tmp_path / "saved"
    model.save_pretrained(out)
    shutil.copy(ckpt / "tokenizer_config.json", out)
    assert DbrxConfig.from_file(out) == parity_config("base")
    ours = load_model(out, DbrxConfig.from_file(out), torch.float32, "cpu", progress=False)
    ref = load_model(ckpt, parity_config("base"), torch.float32, "cpu", progress=False)
    for (name, a), (_, b) in zip(ours.named_parameters(), ref.named_parameters()):
        assert torch.equal(a, b), name
