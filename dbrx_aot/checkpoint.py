"""Hugging Face DBRX checkpoints: the key table, streaming loading, and a random-weight writer.

Every hub key is mapped by the one table below or rejected by name; shapes are checked against
the config; the flat [E*F, D] expert tensors become [E, F, D] in exactly one place
(``to_graph_layout``). Pickled checkpoints (``pytorch_model*.bin``) are refused, never loaded.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Callable, Iterator

import torch
from tqdm.auto import tqdm

from dbrx_aot.config import DbrxConfig
from dbrx_aot.errors import DbrxAotError
from dbrx_aot.model import DbrxModel, replace_weight_format
from dbrx_aot.quantize import stored_tensors
from dbrx_aot.safetensors_io import FLOAT_DTYPES, StreamingWriter, open_checked, read_tensor
from dbrx_aot.staging import replace_dir, staging_dir
from dbrx_aot.tp import shard, shard_model
from dbrx_aot.tokenizer import CHAT_TEMPLATE, EOS_IDS, SPECIAL_TOKENS

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"

# hub key -> graph key; {i} is the block index.
HUB_TO_GRAPH: dict[str, str] = {
    "transformer.wte.weight": "wte.weight",
    "transformer.blocks.{i}.norm_attn_norm.norm_1.weight": "blocks.{i}.norm_1.weight",
    "transformer.blocks.{i}.norm_attn_norm.attn.Wqkv.weight": "blocks.{i}.attn.Wqkv.weight",
    "transformer.blocks.{i}.norm_attn_norm.attn.out_proj.weight": "blocks.{i}.attn.out_proj.weight",
    "transformer.blocks.{i}.norm_attn_norm.norm_2.weight": "blocks.{i}.norm_2.weight",
    "transformer.blocks.{i}.ffn.router.layer.weight": "blocks.{i}.ffn.router.weight",
    "transformer.blocks.{i}.ffn.experts.mlp.w1": "blocks.{i}.ffn.w1",
    "transformer.blocks.{i}.ffn.experts.mlp.v1": "blocks.{i}.ffn.v1",
    "transformer.blocks.{i}.ffn.experts.mlp.w2": "blocks.{i}.ffn.w2",
    "transformer.norm_f.weight": "norm_f.weight",
    "lm_head.weight": "lm_head.weight",
}


def graph_shapes(config: DbrxConfig) -> dict[str, tuple[int, ...]]:
    """The model's own parameter names and shapes (read off a meta-device model)."""
    return {name: shape for name, (shape, _) in stored_specs(config, torch.float32, "same").items()}


def meta_model(config: DbrxConfig, dtype: torch.dtype, weights_format: str = "same") -> DbrxModel:
    """The model on the meta device, computing in ``dtype``, its matrices stored as ``weights_format``."""
    with torch.device("meta"):
        return replace_weight_format(DbrxModel(config).to(dtype), weights_format)


def stored_specs(config: DbrxConfig, dtype: torch.dtype, weights_format: str,
                 tp: int = 1) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """{name: (shape, dtype)} of every tensor a model of this compute dtype and weight format holds
    (each rank's share under tensor parallelism of degree ``tp``)."""
    model = shard_model(meta_model(config, dtype, weights_format), 0, tp, group="")
    return {name: (tuple(p.shape), p.dtype) for name, p in model.named_parameters()}


def hub_shapes(config: DbrxConfig) -> dict[str, tuple[int, ...]]:
    """Every key a hub checkpoint of this config holds, with its shape on disk."""
    E, F, D = config.moe_num_experts, config.ffn_hidden_size, config.d_model
    shapes = graph_shapes(config)
    out = {}
    for hub, graph in hub_to_graph_keys(config).items():
        out[hub] = (E * F, D) if hub.endswith((".w1", ".v1", ".w2")) else shapes[graph]
    return out


def hub_to_graph_keys(config: DbrxConfig) -> dict[str, str]:
    keys = {}
    for hub, graph in HUB_TO_GRAPH.items():
        for i in range(config.n_layers) if "{i}" in hub else [None]:
            keys[hub.format(i=i)] = graph.format(i=i)
    return keys


def to_graph_layout(tensor: torch.Tensor, graph_shape: tuple[int, ...]) -> torch.Tensor:
    """The one reshape: flat experts [E*F, D] -> [E, F, D]; every other tensor keeps its shape."""
    return tensor.reshape(graph_shape)


def checkpoint_shards(path: Path) -> list[Path]:
    """The safetensors files of a HF checkpoint directory, checked against its index."""
    path = Path(path)
    if not path.is_dir():
        raise DbrxAotError(f"{path}: no such checkpoint directory")
    index = path / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            raise DbrxAotError(f"{index}: invalid index, expected JSON with a 'weight_map' ({err})") from None
        names = sorted(set(weight_map.values()))
        for name in names:
            if not (path / name).is_file():
                key = next(k for k, v in weight_map.items() if v == name)
                raise DbrxAotError(f"{index}: shard {name} (holding {key}) is missing from {path}")
        return [path / name for name in names]
    if (path / SINGLE_FILE).is_file():
        return [path / SINGLE_FILE]
    pickled = sorted(p.name for p in path.glob("pytorch_model*.bin"))
    if pickled:
        raise DbrxAotError(f"{path / pickled[0]}: pickled PyTorch checkpoints are refused (unpickling can run "
                           "code); convert it to safetensors first")
    raise DbrxAotError(f"{path}: no {SINGLE_FILE} or {INDEX_FILE} (expected a Hugging Face DBRX checkpoint)")


def iter_checkpoint(path: Path, config: DbrxConfig, dtype: torch.dtype | None,
                    progress: bool = True) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (graph key, tensor in graph layout and ``dtype``, or as stored when None), one tensor
    at a time, checked."""
    expected = hub_shapes(config)
    graph_keys = hub_to_graph_keys(config)
    graph = graph_shapes(config)
    seen: set[str] = set()
    shards = checkpoint_shards(path)
    bar = tqdm(total=len(expected), desc="reading weights", unit="tensor", disable=not progress)
    for shard_file in shards:
        with open_checked(shard_file) as f:
            for key in f.keys():
                if key not in expected:
                    raise DbrxAotError(f"{shard_file}: unexpected key {key} (not a DBRX weight for this config: "
                                       f"{config.n_layers} layers)")
                if key in seen:
                    raise DbrxAotError(f"{shard_file}: key {key} appears in more than one shard")
                tensor = read_tensor(f, shard_file, key)
                if tuple(tensor.shape) != expected[key]:
                    raise DbrxAotError(f"{shard_file}: {key} has shape {list(tensor.shape)}, expected "
                                       f"{list(expected[key])} from config.json")
                if tensor.dtype not in FLOAT_DTYPES:
                    raise DbrxAotError(f"{shard_file}: {key} has dtype {tensor.dtype}, expected a floating dtype")
                seen.add(key)
                tensor = to_graph_layout(tensor, graph[graph_keys[key]])
                yield graph_keys[key], tensor if dtype is None else tensor.to(dtype)
                bar.update()
    bar.close()
    missing = [key for key in expected if key not in seen]
    if missing:
        raise DbrxAotError(f"{path}: missing key {missing[0]} ({len(missing)} missing in all)")


def iter_stored(path: Path, config: DbrxConfig, dtype: torch.dtype, weights_format: str,
                progress: bool = True) -> Iterator[tuple[str, torch.Tensor]]:
    """The checkpoint's tensors as an artifact stores them (``quantize.stored_tensors``): compute
    dtype ``dtype``, the matrices as ``weights_format``; one tensor at a time, every key checked."""
    for name, tensor in iter_checkpoint(path, config, None, progress):
        yield from stored_tensors(name, tensor, weights_format, dtype)


def load_model(path: Path, config: DbrxConfig, dtype: torch.dtype, device: torch.device | str,
               weights: Iterator[tuple[str, torch.Tensor]] | None = None, progress: bool = True,
               weights_format: str = "same", rank: int = 0, tp: int = 1, group: str | None = None) -> DbrxModel:
    """Build the model with uninitialised storage and fill it tensor by tensor (no second copy).

    ``weights``: tensors already in their stored form and shard (an artifact's weights/); without
    it, the checkpoint at ``path`` is read and each tensor converted to ``weights_format`` (and cut to
    rank ``rank``'s shard of ``tp``, collectives over the process group ``group``) as it comes.
    """
    # Shaped, cast and sharded on meta (never allocating another dtype), then given uninitialised storage.
    model = shard_model(meta_model(config, dtype, weights_format), rank, tp, group).to_empty(device=device)
    params = dict(model.named_parameters())
    if weights is None:
        weights = ((name, shard(name, tensor, rank, tp, config))
                   for name, tensor in iter_stored(path, config, dtype, weights_format, progress))
    for name, tensor in weights:
        params[name].data.copy_(tensor)
    return model.eval().requires_grad_(False)


# -- random checkpoints ------------------------------------------------------------------------


def random_tensor(hub_key: str, shape: tuple[int, ...], config: DbrxConfig,
                  generator: torch.Generator) -> torch.Tensor:
    """Weights at a scale where logits are peaked enough for greedy decoding to be meaningful
    (fp32, on the generator's device)."""
    device = generator.device
    if hub_key.endswith(("norm_1.weight", "norm_2.weight", "norm_f.weight")):
        return 1.0 + 0.1 * torch.randn(shape, generator=generator, device=device)
    if hub_key.endswith(".w2"):
        fan_in = config.ffn_hidden_size
    elif hub_key == "transformer.wte.weight":
        fan_in = 1
    else:
        fan_in = config.d_model
    return torch.randn(shape, generator=generator, device=device) / fan_in ** 0.5


def random_weights(config: DbrxConfig, dtype: torch.dtype, device: torch.device | str, seed: int = 0,
                   weights_format: str = "same") -> Iterator[tuple[str, torch.Tensor]]:
    """(graph key, tensor in its stored form) of random weights made on ``device`` at the scales of
    ``write_random_checkpoint``, one tensor at a time: for benchmarks at real width, which need the
    shapes and not the values, without writing and reading the weights through the disk."""
    generator = torch.Generator(device=device).manual_seed(seed)
    graph, hub = graph_shapes(config), hub_shapes(config)
    for hub_key, key in hub_to_graph_keys(config).items():
        tensor = to_graph_layout(random_tensor(hub_key, hub[hub_key], config, generator), graph[key])
        yield from stored_tensors(key, tensor, weights_format, dtype)


def write_random_checkpoint(out: Path, config: DbrxConfig, seed: int = 0, shards: int = 1,
                            dtype: torch.dtype = torch.bfloat16, force: bool = False,
                            progress: bool = True) -> Path:
    """A random-weight checkpoint in exactly the hub layout, written atomically."""
    generator = torch.Generator().manual_seed(seed)
    return write_checkpoint(out, config, lambda key, shape: random_tensor(key, shape, config, generator),
                            shards=shards, dtype=dtype, force=force, progress=progress,
                            desc="writing random weights")


def graph_to_hub(model: DbrxModel) -> Callable[[str, tuple[int, ...]], torch.Tensor]:
    """A tensor source for ``write_checkpoint`` reading a model's own weights (hub key -> tensor)."""
    params = dict(model.named_parameters())
    graph_keys = hub_to_graph_keys(model.config)
    return lambda key, shape: params[graph_keys[key]].detach().reshape(shape)


def write_checkpoint(out: Path, config: DbrxConfig, source: Callable[[str, tuple[int, ...]], torch.Tensor],
                     shards: int = 1, dtype: torch.dtype = torch.bfloat16, force: bool = False,
                     progress: bool = True, desc: str = "writing weights") -> Path:
    """A checkpoint in exactly the hub layout (config.json, generation and tokenizer configs,
    sharded safetensors), each tensor ``source(hub key, hub shape)`` cast to ``dtype``; atomic."""
    out = Path(out)
    if shards < 1:
        raise DbrxAotError(f"--shards={shards}, expected at least 1")
    if out.exists() and not force:
        raise DbrxAotError(f"{out}: already exists (use --force to overwrite)")
    shapes = hub_shapes(config)
    keys = list(shapes)
    if shards > len(keys):
        raise DbrxAotError(f"--shards={shards}, expected at most {len(keys)} (the number of tensors)")
    tmp = staging_dir(out)
    try:
        groups = [keys[i * len(keys) // shards:(i + 1) * len(keys) // shards] for i in range(shards)]
        weight_map, total = {}, 0
        bar = tqdm(total=len(keys), desc=desc, unit="tensor", disable=not progress)
        for n, group in enumerate(groups, 1):
            name = SINGLE_FILE if shards == 1 else f"model-{n:05d}-of-{shards:05d}.safetensors"
            specs = [(key, shapes[key], dtype) for key in group]
            with StreamingWriter(tmp / name, specs) as writer:
                for key in group:
                    tensor = source(key, shapes[key]).to(dtype)
                    writer.write(key, tensor)
                    total += tensor.numel() * tensor.element_size()
                    weight_map[key] = name
                    bar.update()
        bar.close()
        if shards > 1:
            index = {"metadata": {"total_size": total}, "weight_map": weight_map}
            (tmp / INDEX_FILE).write_text(json.dumps(index, indent=2))
        hf_config = config.to_hf_dict()
        hf_config["torch_dtype"] = str(dtype).removeprefix("torch.")
        (tmp / "config.json").write_text(json.dumps(hf_config, indent=2))
        (tmp / "generation_config.json").write_text(json.dumps(
            {"bos_token_id": SPECIAL_TOKENS["<|endoftext|>"], "eos_token_id": list(EOS_IDS),
             "pad_token_id": SPECIAL_TOKENS["<|pad|>"]}, indent=2))
        (tmp / "tokenizer_config.json").write_text(json.dumps(
            {"bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>", "pad_token": "<|pad|>",
             "unk_token": "<|endoftext|>", "model_max_length": config.max_seq_len,
             "tokenizer_class": "GPT2Tokenizer", "chat_template": CHAT_TEMPLATE}, indent=2))
        replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
