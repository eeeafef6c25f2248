"""A conversation over one KV cache: each turn feeds only its new tokens (no re-prefill of history).

The chat template decides the text; a turn's new tokens are the difference between the template
rendered with and without it, fed after the tokens already in the cache (which are the tokens the
model actually saw and generated, never a re-tokenisation of them).
"""

from __future__ import annotations

from typing import Callable

from dbrx_aot.errors import DbrxAotError
from dbrx_aot.generate import generate
from dbrx_aot.runtimes import Runtime
from dbrx_aot.tokenizer import TextStream

IM_END = 100279


class Conversation:
    def __init__(self, runtime: Runtime, system: str | None = None, *, max_new_tokens: int = 256,
                 temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None,
                 seed: int | None = None):
        self.runtime = runtime
        self.system = system
        self.sampling = dict(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                             seed=seed)
        self.reset()

    def reset(self) -> None:
        self.messages: list[dict[str, str]] = [] if self.system is None else [{"role": "system",
                                                                               "content": self.system}]
        self.cache = self.runtime.new_cache()
        self.cached = 0            # tokens in the cache (row 0)
        self.pending: list[int] = []  # tokens chosen but not yet fed (the last reply's final token)
        self.finish_reason: str | None = None  # why the last reply ended

    @property
    def tokens_used(self) -> int:
        return self.cached + len(self.pending)

    def turn_ids(self, user: str) -> list[int]:
        tok = self.runtime.tokenizer
        before = tok.render_chat(self.messages, add_generation_prompt=False) if self.has_reply() else ""
        after = tok.render_chat(self.messages + [{"role": "user", "content": user}], add_generation_prompt=True)
        if not after.startswith(before):
            raise DbrxAotError("chat template: a new turn does not extend the rendered conversation; "
                               "this template cannot keep the cache between turns")
        ids = self.pending + tok.encode_with_specials(after[len(before):])
        return ids

    def has_reply(self) -> bool:
        return any(m["role"] == "assistant" for m in self.messages)

    def send(self, user: str, write: Callable[[str], None] | None = None) -> str:
        """Feed the user's turn, generate the reply, return its text. ``write`` receives the reply's
        text pieces as they are generated (nothing is written without it); afterwards
        ``finish_reason`` says why it ended: ``stop``, ``length`` (max_new_tokens) or ``cache``."""
        write = write or (lambda piece: None)
        rt = self.runtime
        ids = self.turn_ids(user)
        room = rt.max_seq_len - self.cached
        if len(ids) + 1 > room:
            if self.cached == 0:
                raise DbrxAotError(f"this message is {len(ids)} tokens with the chat template and system prompt, "
                                   f"and the cache holds {rt.max_seq_len} (one more is needed to reply); shorten "
                                   "it, or export with a larger --max-seq-len")
            raise DbrxAotError(f"the conversation no longer fits the cache ({self.cached} tokens so far + "
                               f"{len(ids)} for this turn, of {rt.max_seq_len}); /reset to start a new "
                               "conversation, or export with a larger --max-seq-len")
        stream = TextStream(rt.tokenizer)
        stops = set(rt.tokenizer.eos_ids)
        pieces: list[str] = []

        def on_token(row: int, token: int) -> None:
            if row == 0 and token not in stops:
                piece = stream.push(token)
                pieces.append(piece)
                write(piece)

        # Interrupted (Ctrl-C) or failed here, the turn leaves no trace: the state below is only
        # updated after it, and the cache slots it wrote lie past ``cached``, rewritten before any
        # later query can read them (the model's padding rule).
        reasons: dict[int, str] = {}
        out = generate(rt, [ids], cache=self.cache, offsets=[self.cached], on_token=on_token,
                       on_finish=reasons.__setitem__, **self.sampling)[0]
        self.finish_reason = reasons[0]
        tail = stream.flush()
        pieces.append(tail)
        write(tail)
        # The cache now holds the turn and every reply token but the last.
        self.cached += len(ids) + len(out) - 1
        # The template closes a reply with <|im_end|>: feed that next turn (in place of another stop id,
        # or after the last token when the reply was cut at max_new_tokens).
        self.pending = [IM_END] if out[-1] in stops else [out[-1], IM_END]
        reply = "".join(pieces)
        self.messages += [{"role": "user", "content": user}, {"role": "assistant", "content": reply}]
        return reply
