"""DBRX configuration: one frozen dataclass, read from a checkpoint's config.json.

Two on-disk forms are accepted: the released hub form (``attn_config.rope_theta``) and the form
transformers 5 saves (a top-level ``rope_parameters``). Bookkeeping keys that transformers writes
into every config (id2label, return_dict, ...) are ignored; values the model cannot honour raise.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import torch

from dbrx_aot.errors import DbrxAotError

NORM_EPS = 1e-5  # DBRX's LayerNorm eps (torch's default; not a config key)


def read_json(path: Path) -> Any:
    """A JSON file's value; a file that is not JSON is the user's error, named."""
    try:
        return json.loads(Path(path).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise DbrxAotError(f"{path}: invalid JSON ({err})") from None


@dataclasses.dataclass(frozen=True)
class DbrxConfig:
    d_model: int
    n_heads: int
    n_layers: int
    vocab_size: int
    max_seq_len: int
    kv_n_heads: int
    clip_qkv: float | None
    rope_theta: float
    ffn_hidden_size: int
    moe_num_experts: int
    moe_top_k: int
    moe_normalize_expert_weights: float | None = 1.0

    def __post_init__(self) -> None:
        self.validate()

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def qkv_size(self) -> int:
        return self.d_model + 2 * self.kv_n_heads * self.head_dim

    def validate(self, source: str = "config") -> None:
        def bad(key: str, expected: str, value: Any) -> DbrxAotError:
            return DbrxAotError(f"{source}: {key}={value!r}, expected {expected}")

        for key in ("d_model", "n_heads", "n_layers", "vocab_size", "max_seq_len", "kv_n_heads",
                    "ffn_hidden_size", "moe_num_experts", "moe_top_k"):
            value = getattr(self, key)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise bad(key, "a positive integer", value)
        if self.d_model % self.n_heads:
            raise bad("n_heads", f"a divisor of d_model={self.d_model}", self.n_heads)
        if self.head_dim % 2:
            raise bad("n_heads", f"a head_dim (d_model/n_heads) that is even for RoPE, got {self.head_dim}",
                      self.n_heads)
        if self.n_heads % self.kv_n_heads:
            raise bad("attn_config.kv_n_heads", f"a divisor of n_heads={self.n_heads}", self.kv_n_heads)
        if self.moe_top_k > self.moe_num_experts:
            raise bad("ffn_config.moe_top_k", f"at most moe_num_experts={self.moe_num_experts}", self.moe_top_k)
        if self.clip_qkv is not None and not self.clip_qkv > 0:
            raise bad("attn_config.clip_qkv", "a positive number or null", self.clip_qkv)
        if not self.rope_theta > 0:
            raise bad("rope_theta", "a positive number", self.rope_theta)
        if self.moe_normalize_expert_weights is not None and not self.moe_normalize_expert_weights > 0:
            raise bad("ffn_config.moe_normalize_expert_weights", "a positive p-norm or null",
                      self.moe_normalize_expert_weights)

    # -- reading ---------------------------------------------------------------------------------

    @classmethod
    def from_file(cls, path: str | Path) -> DbrxConfig:
        path = Path(path)
        if path.is_dir():
            path = path / "config.json"
        if not path.is_file():
            raise DbrxAotError(f"{path}: no such file (expected a DBRX config.json)")
        return cls.from_dict(read_json(path), source=str(path))

    @classmethod
    def from_dict(cls, data: dict, source: str = "config") -> DbrxConfig:
        """Flatten HF's nested config (hub form or transformers-5 form) into a DbrxConfig."""
        if not isinstance(data, dict):
            raise DbrxAotError(f"{source}: expected a JSON object")
        model_type = data.get("model_type")
        if model_type != "dbrx":
            raise DbrxAotError(f"{source}: model_type={model_type!r}, expected 'dbrx' (not a DBRX config)")
        attn = data.get("attn_config") or {}
        ffn = data.get("ffn_config") or {}
        if not isinstance(attn, dict) or not isinstance(ffn, dict):
            raise DbrxAotError(f"{source}: attn_config and ffn_config must be JSON objects")
        if data.get("tie_word_embeddings", False):
            raise DbrxAotError(f"{source}: tie_word_embeddings=true, expected false (DBRX's lm_head is untied)")
        act = ffn.get("ffn_act_fn") or {"name": "silu"}
        if not isinstance(act, dict) or act.get("name", "silu") != "silu" or set(act) - {"name"}:
            raise DbrxAotError(f"{source}: ffn_config.ffn_act_fn={act!r}, expected {{'name': 'silu'}} "
                               "(the only activation DBRX uses)")
        # moe_jitter_eps only perturbs inputs during training; inference ignores it, as the
        # reference code does (dbrx-base ships 0.01).
        missing = [key for key in ("d_model", "n_heads", "n_layers", "vocab_size") if key not in data]
        missing += [f"ffn_config.{key}" for key in ("ffn_hidden_size", "moe_num_experts", "moe_top_k")
                    if key not in ffn]
        if missing:
            raise DbrxAotError(f"{source}: missing key {missing[0]} (a DBRX config.json needs it)")
        try:
            return cls(
                d_model=data["d_model"],
                n_heads=data["n_heads"],
                n_layers=data["n_layers"],
                vocab_size=data["vocab_size"],
                max_seq_len=data.get("max_seq_len", 2048),
                kv_n_heads=attn.get("kv_n_heads", 1),
                clip_qkv=attn.get("clip_qkv"),
                rope_theta=float(_rope_theta(data, attn, source)),
                ffn_hidden_size=ffn["ffn_hidden_size"],
                moe_num_experts=ffn["moe_num_experts"],
                moe_top_k=ffn["moe_top_k"],
                moe_normalize_expert_weights=ffn.get("moe_normalize_expert_weights", 1.0),
            )
        except DbrxAotError as err:
            raise DbrxAotError(str(err).replace("config:", f"{source}:", 1)) from None

    # -- writing ---------------------------------------------------------------------------------

    def to_hf_dict(self) -> dict:
        """The hub form, plus ``rope_parameters`` so transformers 5 reads the same theta."""
        ffn: dict[str, Any] = {
            "ffn_hidden_size": self.ffn_hidden_size,
            "moe_num_experts": self.moe_num_experts,
            "moe_top_k": self.moe_top_k,
            "moe_jitter_eps": 0,
            "moe_loss_weight": 0.05,
            "moe_normalize_expert_weights": self.moe_normalize_expert_weights,
        }
        return {
            "architectures": ["DbrxForCausalLM"],
            "model_type": "dbrx",
            "d_model": self.d_model,
            "n_heads": self.n_heads,
            "n_layers": self.n_layers,
            "max_seq_len": self.max_seq_len,
            "vocab_size": self.vocab_size,
            "attn_config": {"clip_qkv": self.clip_qkv, "kv_n_heads": self.kv_n_heads,
                            "rope_theta": self.rope_theta},
            "ffn_config": ffn,
            "rope_parameters": {"rope_type": "default", "rope_theta": self.rope_theta},
            "emb_pdrop": 0.0,
            "resid_pdrop": 0.0,
            "initializer_range": 0.02,
            "output_router_logits": False,
            "tie_word_embeddings": False,
            "torch_dtype": "bfloat16",
            "use_cache": True,
        }

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    # -- sizes -----------------------------------------------------------------------------------

    def param_count(self) -> int:
        D, F, E, V = self.d_model, self.ffn_hidden_size, self.moe_num_experts, self.vocab_size
        per_block = 2 * D + self.qkv_size * D + D * D + E * D + 3 * E * F * D
        return 2 * V * D + D + self.n_layers * per_block


def _rope_theta(data: dict, attn: dict, source: str) -> float:
    """The hub form's attn_config.rope_theta wins; transformers 5 writes rope_parameters instead."""
    hub = attn.get("rope_theta")
    params = data.get("rope_parameters")
    if params is not None:
        if not isinstance(params, dict):
            raise DbrxAotError(f"{source}: rope_parameters must be a JSON object")
        rope_type = params.get("rope_type", "default")
        if rope_type != "default":
            raise DbrxAotError(f"{source}: rope_parameters.rope_type={rope_type!r}, expected 'default' "
                               "(DBRX uses plain RoPE)")
    from_params = params.get("rope_theta") if params else None
    if hub is not None:
        # Both present and different: the released checkpoint's own key is the model's truth;
        # transformers 5 fills rope_parameters with its 10000 default when it ignored rope_theta.
        return hub
    if from_params is not None:
        return from_params
    return 10000.0  # neither key: what the reference code defaults to


PRESETS: dict[str, DbrxConfig] = {
    # Tests: the real vocabulary (so the tokenizer's ids are valid) at toy width.
    "tiny": DbrxConfig(d_model=64, n_heads=4, n_layers=2, vocab_size=100352, max_seq_len=2048,
                       kv_n_heads=2, clip_qkv=8.0, rope_theta=500000.0, ffn_hidden_size=32,
                       moe_num_experts=16, moe_top_k=4),
    # CPU benchmarks: real vocabulary, 16 experts top-4, a few layers of modest width.
    "small": DbrxConfig(d_model=512, n_heads=8, n_layers=4, vocab_size=100352, max_seq_len=2048,
                        kv_n_heads=2, clip_qkv=8.0, rope_theta=500000.0, ffn_hidden_size=1024,
                        moe_num_experts=16, moe_top_k=4),
    # The released dbrx-instruct numbers exactly.
    "dbrx-132b": DbrxConfig(d_model=6144, n_heads=48, n_layers=40, vocab_size=100352, max_seq_len=32768,
                            kv_n_heads=8, clip_qkv=8.0, rope_theta=500000.0, ffn_hidden_size=10752,
                            moe_num_experts=16, moe_top_k=4),
}


def preset(name: str, layers: int | None = None) -> DbrxConfig:
    """A preset; ``layers`` keeps its widths with fewer layers (a slice of the released model)."""
    if name not in PRESETS:
        raise DbrxAotError(f"unknown preset {name!r}, expected one of {', '.join(PRESETS)}")
    config = PRESETS[name]
    if layers is None:
        return config
    if not isinstance(layers, int) or isinstance(layers, bool) or not 1 <= layers <= config.n_layers:
        raise DbrxAotError(f"--layers {layers}: expected 1 to {config.n_layers} (the {name} preset's layers)")
    return dataclasses.replace(config, n_layers=layers)


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def parse_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        if dtype in DTYPES.values():
            return dtype
        dtype = str(dtype)
    if dtype not in DTYPES:
        raise DbrxAotError(f"--dtype {dtype}: expected one of {', '.join(DTYPES)}")
    return DTYPES[dtype]


def check_static_shapes(config: DbrxConfig, batch_size: int, max_seq_len: int, prefill_chunk: int) -> None:
    """B, S, P: positive, S within the model's trained length, P within S."""
    for option, value in (("--batch-size", batch_size), ("--max-seq-len", max_seq_len),
                          ("--prefill-chunk", prefill_chunk)):
        if not isinstance(value, int) or value < 1:
            raise DbrxAotError(f"{option} {value}: expected a positive integer")
    if max_seq_len > config.max_seq_len:
        raise DbrxAotError(f"--max-seq-len {max_seq_len}: expected at most the model's max_seq_len "
                           f"{config.max_seq_len}")
    if prefill_chunk > max_seq_len:
        raise DbrxAotError(f"--prefill-chunk {prefill_chunk}: expected at most --max-seq-len {max_seq_len}")
