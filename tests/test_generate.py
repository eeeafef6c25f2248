"""The generation loop against a fake runtime whose logits are known."""

from __future__ import annotations

import pytest
import torch

from dbrx_aot import generate
from dbrx_aot.config import DbrxConfig
from dbrx_aot.errors import DbrxAotError
from dbrx_aot.generate import sample
from dbrx_aot.runtimes import RuntimeBase
from dbrx_aot.tokenizer import Tokenizer

V = 50


class FakeRuntime(RuntimeBase):
    """Next token = (7 * token + position + 1) % V, as a peaked distribution; records every call.

    The cache records which token sat at which position, so the test can see what was fed.
    """

    name = "fake"

    def __init__(self, batch_size=2, max_seq_len=32, prefill_chunk=4, spread=False):
        self.config = DbrxConfig(d_model=8, n_heads=2, n_layers=1, vocab_size=V, max_seq_len=max_seq_len,
                                 kv_n_heads=1, clip_qkv=None, rope_theta=1e4, ffn_hidden_size=4,
                                 moe_num_experts=2, moe_top_k=1)
        self.tokenizer = Tokenizer()
        self.device, self.dtype = torch.device("cpu"), torch.float32
        self.batch_size, self.max_seq_len, self.prefill_chunk = batch_size, max_seq_len, prefill_chunk
        self.spread = spread  # flat-ish logits, so sampling has choices
        self.calls = []

    def _logits(self, tokens, positions, cache):
        self.calls.append((tokens.clone(), positions.clone()))
        cache.k[0, :, 0, :, 0].scatter_(1, positions, tokens.float())  # remember what was fed where
        nxt = (7 * tokens + positions + 1) % V
        logits = torch.nn.functional.one_hot(nxt, V).float() * (1.0 if self.spread else 10.0)
        return logits

    def prefill(self, tokens, positions, cache, logit_index=None):
        tokens, positions = self.check_call(tokens, positions, cache, self.prefill_chunk)
        logits = self._logits(tokens, positions, cache)
        if logit_index is None:
            return logits
        index = torch.as_tensor(logit_index)
        index = index[:, None] if index.dim() == 1 else index                   # [B, R]
        return logits[torch.arange(len(tokens))[:, None], index]                # [B, R, V]

    def decode(self, tokens, positions, cache):
        tokens, positions = self.check_call(tokens, positions, cache, 1)
        return self._logits(tokens, positions, cache)


def expected_greedy(prompt, n):
    seq = list(prompt)
    for _ in range(n):
        seq.append((7 * seq[-1] + len(seq) - 1 + 1) % V)
    return seq[len(prompt):]


def test_greedy_is_deterministic_and_exact():
    rt = FakeRuntime()
    prompts = [[1, 2, 3, 4, 5, 6, 7], [9]]  # 7 tokens: two prefill chunks of 4; the other row one token
    out = generate(rt, prompts, max_new_tokens=6, stop_ids=[])
    assert out == [expected_greedy(p, 6) for p in prompts]
    assert out == generate(FakeRuntime(), prompts, max_new_tokens=6, stop_ids=[])
    # Prefill ran in two chunks, then 5 decode calls (the 6th token is never fed back).
    assert [c[0].shape[1] for c in rt.calls] == [4, 4, 1, 1, 1, 1, 1]
    # The first row's positions run on across chunks; the padding after a row continues its positions.
    assert rt.calls[1][1][0].tolist() == [4, 5, 6, 7]
    assert rt.calls[0][1][1].tolist() == [0, 1, 2, 3]


def test_cache_holds_prompt_and_fed_tokens():
    rt = FakeRuntime(batch_size=1)
    cache = rt.new_cache()
    out = generate(rt, [[3, 4, 5]], max_new_tokens=4, stop_ids=[], cache=cache)
    fed = cache.k[0, 0, 0, :6, 0].long().tolist()
    assert fed == [3, 4, 5] + out[0][:3]


def test_continuation_with_offsets():
    """A second turn continues the same cache at its offset, as a chat does."""
    rt = FakeRuntime(batch_size=1)
    cache = rt.new_cache()
    first = generate(rt, [[3, 4, 5]], max_new_tokens=3, stop_ids=[], cache=cache)[0]
    history = [3, 4, 5] + first
    second = generate(rt, [[first[-1], 11]], max_new_tokens=3, stop_ids=[], cache=cache, offsets=[len(history) - 1])
    assert second[0] == expected_greedy(history + [11], 3)


def test_stop_ids_and_max_new_tokens():
    prompt = [1]
    full = expected_greedy(prompt, 10)
    stop = full[3]
    out = generate(FakeRuntime(batch_size=1), [prompt], max_new_tokens=10, stop_ids=[stop])
    assert out[0] == full[: full.index(stop) + 1]
    assert len(generate(FakeRuntime(batch_size=1), [prompt], max_new_tokens=5, stop_ids=[])[0]) == 5
    # The default stop set is the eos set; an empty list never stops.
    assert generate(FakeRuntime(batch_size=1), [prompt], max_new_tokens=10, stop_ids=[])[0] == full


def test_rows_stop_independently():
    prompts = [[3], [2]]
    full = [expected_greedy(p, 8) for p in prompts]
    stop = full[0][2]
    assert stop not in full[1]
    out = generate(FakeRuntime(), prompts, max_new_tokens=8, stop_ids=[stop])
    assert out == [full[0][: full[0].index(stop) + 1], full[1]]


def test_cache_end_stops_generation():
    rt = FakeRuntime(batch_size=1, max_seq_len=8, prefill_chunk=4)
    reasons = {}
    out = generate(rt, [[1, 2, 3, 4, 5]], max_new_tokens=10, stop_ids=[], on_finish=reasons.__setitem__)
    assert len(out[0]) == 4  # positions 5, 6, 7 fed; the 4th new token has no slot left
    assert reasons == {0: "cache"}
    with pytest.raises(DbrxAotError, match="do not fit the cache"):
        generate(rt, [list(range(9))], max_new_tokens=1)


def test_seed_reproduces_and_differs():
    rt = FakeRuntime(spread=True)
    kw = dict(max_new_tokens=12, temperature=1.0, stop_ids=[])
    a = generate(rt, [[1], [2]], seed=5, **kw)
    assert a == generate(rt, [[1], [2]], seed=5, **kw)
    assert a != generate(rt, [[1], [2]], seed=6, **kw)


def test_top_k_1_and_tiny_top_p_are_greedy():
    rt = FakeRuntime(spread=True)
    greedy = generate(rt, [[1], [2]], max_new_tokens=8, stop_ids=[])
    assert generate(rt, [[1], [2]], max_new_tokens=8, temperature=1.0, top_k=1, seed=0, stop_ids=[]) == greedy
    assert generate(rt, [[1], [2]], max_new_tokens=8, temperature=1.0, top_p=1e-6, seed=0, stop_ids=[]) == greedy


def test_sample_filters():
    logits = torch.tensor([[0.0, 1.0, 2.0, 3.0]])
    g = torch.Generator().manual_seed(0)
    draws = {sample(logits, 1.0, top_k=2, generator=g).item() for _ in range(200)}
    assert draws == {2, 3}
    # top_p 0.7: the sorted probs are .64, .24, ...: keep 3 (.64 < .7) and 2.
    draws = {sample(logits, 1.0, top_p=0.7, generator=g).item() for _ in range(200)}
    assert draws == {2, 3}


def test_on_token_streams_in_order():
    seen = []
    out = generate(FakeRuntime(), [[1], [2]], max_new_tokens=4, stop_ids=[], on_token=lambda r, t: seen.append((r, t)))
    assert [t for r, t in seen if r == 0] == out[0] and [t for r, t in seen if r == 1] == out[1]


@pytest.mark.parametrize("kwargs, message", [
    (dict(prompts=[[1]] * 3), "3 prompts, expected 1 to 2"),
    (dict(prompts=[1, 2, 3]), "expected a list of token-id lists"),
    (dict(prompts=[[]]), "prompt 0 is empty"),
    (dict(prompts=[[V]]), "outside"),
    (dict(temperature=-1), "--temperature"),
    (dict(top_p=0.0), "--top-p"),
    (dict(top_k=0), "--top-k"),
    (dict(max_new_tokens=0), "--max-new-tokens"),
])
def test_bad_arguments(kwargs, message):
    args = dict(prompts=[[1]], max_new_tokens=2)
    args.update(kwargs)
    with pytest.raises(DbrxAotError, match=message):
        generate(FakeRuntime(), args.pop("prompts"), **args)


def test_finish_reasons():
    prompts = [[3], [2]]
    full = [expected_greedy(p, 8) for p in prompts]
    stop = full[0][2]
    reasons = {}
    generate(FakeRuntime(), prompts, max_new_tokens=8, stop_ids=[stop], on_finish=reasons.__setitem__)
    assert reasons == {0: "stop", 1: "length"}
