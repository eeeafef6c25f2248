"""The static-shape model: chunking, batching, caching and torch.export."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch

import dbrx_aot
from conftest import TOLERANCE
from dbrx_aot.model import CachedStep, FunctionalStep, resolve_moe_mode

ATOL = TOLERANCE[("eager", torch.float32)]


@pytest.fixture(scope="module")
def path(parity_checkpoints):
    return parity_checkpoints["base"]


def load(path, **kw):
    return dbrx_aot.load_runtime(path, "eager", progress=False, **{"max_seq_len": 64, "prefill_chunk": 8, **kw})


def ids(n: int, seed: int, vocab: int = 256) -> list[int]:
    return torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


@pytest.mark.parametrize("moe", ["dense", "gather"])
def test_chunked_prefill_equals_single_shot(path, moe):
    x = torch.tensor([ids(30, 1)])
    one_shot = load(path, prefill_chunk=32, moe=moe).logits(x)
    for chunk in (1, 7, 8):
        chunked = load(path, prefill_chunk=chunk, moe=moe).logits(x)
        torch.testing.assert_close(chunked, one_shot, atol=ATOL, rtol=0)


def test_batch_of_different_lengths_equals_each_alone(path):
    prompts = [ids(3, 2), ids(19, 3), ids(11, 4)]
    batched = load(path, batch_size=3)
    alone = load(path, batch_size=1)
    got = dbrx_aot.generate(batched, prompts, max_new_tokens=12, stop_ids=[])
    for prompt, row in zip(prompts, got):
        assert row == dbrx_aot.generate(alone, [prompt], max_new_tokens=12, stop_ids=[])[0]
    # And the logits themselves: a row's valid positions are untouched by its neighbours' padding.
    for b, prompt in enumerate(prompts):
        solo = alone.logits(torch.tensor([prompt]))[0]
        cache = batched.new_cache()
        tokens = torch.zeros(3, 8, dtype=torch.int64)
        n = min(len(prompt), 8)
        tokens[b, :n] = torch.tensor(prompt[:n])
        positions = torch.arange(8).expand(3, 8)
        logits = batched.prefill(tokens, positions, cache)
        torch.testing.assert_close(logits[b, :n], solo[:n], atol=ATOL, rtol=0)


@pytest.mark.parametrize("moe", ["dense", "gather", "auto"])
def test_prefill_then_decode_equals_long_prefill(path, moe):
    rt = load(path, moe=moe)
    seq = ids(40, 5)
    full = rt.logits(torch.tensor([seq]))[0]
    cache = rt.new_cache()
    start = 13
    stepwise = []
    for c in range(0, start, 8):
        chunk = seq[c:min(c + 8, start)]
        tokens = torch.tensor([chunk + [0] * (8 - len(chunk))])
        logits = rt.prefill(tokens, torch.arange(c, c + 8)[None], cache)
        stepwise.append(logits[0, :len(chunk)])
    for p in range(start, len(seq)):
        stepwise.append(rt.decode(torch.tensor([[seq[p]]]), torch.tensor([[p]]), cache)[0])
    torch.testing.assert_close(torch.cat(stepwise), full, atol=ATOL, rtol=0)


def test_padding_at_the_cache_end_does_not_corrupt(path):
    """A last chunk that runs past S clamps its padding positions to S-1 and stays exact."""
    rt = load(path, max_seq_len=20, prefill_chunk=8)
    seq = ids(20, 6)
    torch.testing.assert_close(rt.logits(torch.tensor([seq])), load(path, max_seq_len=20, prefill_chunk=20)
                               .logits(torch.tensor([seq])), atol=ATOL, rtol=0)


def test_auto_mode_picks_gather_for_small_decode(path):
    rt = load(path, moe="auto")
    config = rt.config
    assert resolve_moe_mode("auto", 1, config) == "gather"       # 1 * k=2 < E=8
    assert resolve_moe_mode("auto", 8, config) == "dense"        # 8 * 2 >= 8
    assert rt._decode.moe == "gather" and rt._prefill.moe == "dense"
    # Grouped where it compiles and was measured faster: on CPU, no ONNX graph to match, from
    # GROUPED_MIN_ROWS slots per expert: fp32 16 (16 * E=8 / k=2 = 64 tokens a call), bf16 128 (512).
    bf16, fp32 = torch.bfloat16, torch.float32
    assert resolve_moe_mode("auto", 512, config, bf16) == "grouped"
    assert resolve_moe_mode("auto", 511, config, bf16) == "dense"
    assert resolve_moe_mode("auto", 1, config, bf16) == "gather"
    assert resolve_moe_mode("auto", 64, config, fp32) == "grouped"
    assert resolve_moe_mode("auto", 63, config, fp32) == "dense"
    assert resolve_moe_mode("auto", 512, config, bf16, onnx=True) == "dense"
    assert resolve_moe_mode("auto", 512, config, bf16, torch.device("cuda")) == "dense"
    assert resolve_moe_mode("auto", 512, config, torch.float16) == "dense"  # not measured
    bf16_rt = load(path, moe="auto", dtype="bfloat16", batch_size=8, max_seq_len=128, prefill_chunk=64)
    assert (bf16_rt._prefill.moe, bf16_rt._decode.moe) == ("grouped", "dense")  # 8 * 64 = 512 tokens; 8 * 2 = 16


def test_grouped_moe_refuses_what_cannot_compile(path):
    config = load(path).config
    unaligned = dataclasses.replace(config, ffn_hidden_size=config.ffn_hidden_size + 4)
    with pytest.raises(dbrx_aot.DbrxAotError, match="--moe grouped: d_model .* must be multiples of 8"):
        resolve_moe_mode("grouped", 8, unaligned, torch.bfloat16)
    assert resolve_moe_mode("grouped", 8, unaligned, torch.float32) == "grouped"  # the project op has no such rule
    with pytest.raises(dbrx_aot.DbrxAotError, match="--moe grouped: ONNX has no grouped matrix product"):
        resolve_moe_mode("grouped", 8, config, torch.bfloat16, onnx=True)
    with pytest.raises(dbrx_aot.DbrxAotError, match="--moe sparse: expected one of auto, dense, gather, grouped"):
        resolve_moe_mode("sparse", 8, config)


@pytest.mark.parametrize("form", ["float32", "bfloat16", "int8"])
@pytest.mark.parametrize("router", ["random", "skewed"])
def test_grouped_moe_equals_dense(form, router):
    """Grouped (slots sorted by expert, one product per expert over its rows) gives dense's output,
    with empty experts and with every token on the same k experts (one group holds all of them)."""
    from conftest import parity_config
    from dbrx_aot.model import Int8MoE, MoE

    torch.manual_seed(0)
    config = parity_config("base")  # torch._grouped_mm wants rows of a multiple of 16 bytes (bf16: D, F % 8 == 0)
    moe = MoE(config)
    for p in moe.parameters():
        p.data.normal_(0, 0.3)
    if router == "skewed":
        moe.router.weight.data.zero_()
        moe.router.weight.data[:config.moe_top_k] = 5.0  # all tokens pick the same experts
    x = torch.randn(2, 7, config.d_model)
    x = x.abs() if router == "skewed" else x  # positive sums: the first k experts win every token
    if form == "bfloat16":
        # bf16 rounds in another order in each form: grouped held to dense bf16's own error against
        # the same bf16 weights computed in fp32.
        moe = moe.to(torch.bfloat16)
        exact = copy.deepcopy(moe).float()(x.bfloat16().float(), "dense")
        bar = 2 * (moe(x.bfloat16(), "dense").float() - exact).abs().max() + 1e-3
        assert (moe(x.bfloat16(), "grouped").float() - exact).abs().max() <= bar
        return
    moe = Int8MoE(moe) if form == "int8" else moe
    dense = moe(x, "dense")
    atol = 1e-6 * dense.abs().max().item()  # fp32 sums in another order
    torch.testing.assert_close(moe(x, "grouped"), dense, atol=atol, rtol=1e-5)
    torch.testing.assert_close(moe(x, "gather"), dense, atol=atol, rtol=1e-5)


@pytest.mark.parametrize("attention", ["math", "sdpa"])
def test_attention_within_cache_extents_equals_all_slots(path, attention):
    """use_attention_extents (model.within_extent, torch.cond): a chunk attends over the smallest
    extent that holds every cached slot of its rows, giving the logits and keys of attending over
    all S slots; rows whose first positions fall under each extent, between them, and past the last."""
    from dbrx_aot.model import cache_shape, use_attention_extents, use_sdpa

    model = load(path).model
    if attention == "sdpa":
        model = use_sdpa(copy.deepcopy(model))
    within = use_attention_extents(copy.deepcopy(model), (0, 8, 32))
    config, (B, T, S) = model.config, (2, 8, 64)
    g = torch.Generator().manual_seed(0)
    k_cache, v_cache = (torch.randn(cache_shape(config, B, S), generator=g) for _ in range(2))
    tokens = torch.randint(0, 256, (B, T), generator=g)
    for firsts in [(0, 0), (8, 0), (5, 8), (20, 31), (32, 1), (40, 56)]:
        positions = torch.stack([torch.arange(f, f + T) for f in firsts])
        with torch.no_grad():
            want, got = (m(tokens, positions, k_cache, v_cache, "dense") for m in (model, within))
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, atol=ATOL, rtol=0, msg=f"first positions {firsts}")


@pytest.mark.parametrize("moe", ["dense", "gather"])
@pytest.mark.parametrize("graph", ["prefill", "decode"])
def test_torch_export_in_every_moe_mode(path, moe, graph):
    """Both graph forms export with strict=False: no graph break, no data-dependent shape."""
    rt = load(path, batch_size=2)
    T = 8 if graph == "prefill" else 1
    tokens = torch.tensor([ids(T, 7), ids(T, 8)])
    positions = torch.tensor([list(range(5, 5 + T)), list(range(0, T))])
    for step in (CachedStep(rt.model, moe), FunctionalStep(rt.model, moe)):
        cache = rt.new_cache()
        cache.k.normal_()
        cache.v.normal_()
        args = (tokens, positions, cache.k.clone(), cache.v.clone())
        program = torch.export.export(step, args, strict=False)
        targets = {str(n.target) for n in program.graph.nodes if n.op == "call_function"}
        assert not targets & {"aten._local_scalar_dense.default", "aten.nonzero.default"}  # .item(), where()
        assert not program.range_constraints  # no symbolic (data-dependent) sizes
        eager_args = (tokens, positions, cache.k.clone(), cache.v.clone())
        expected = step(*eager_args)
        exported_args = (tokens, positions, cache.k.clone(), cache.v.clone())
        got = program.module()(*exported_args)
        torch.testing.assert_close(got, expected, atol=ATOL, rtol=0)
        if isinstance(step, CachedStep):  # the cache mutation survives export
            torch.testing.assert_close(exported_args[2], eager_args[2], atol=ATOL, rtol=0)


def test_logit_index_selects_one_position_per_row(path):
    """prefill(..., logit_index) computes lm_head at one chunk position per row: the same logits as
    every position's at that index; an index outside the chunk is the caller's error."""
    rt = load(path, batch_size=2)
    tokens = torch.tensor([ids(8, 3), ids(8, 4)])
    positions = torch.arange(8).expand(2, 8)
    every = rt.prefill(tokens, positions, rt.new_cache())
    index = torch.tensor([7, 2])
    one = rt.prefill(tokens, positions, rt.new_cache(), index)
    assert one.shape == (2, 1, every.shape[-1])
    torch.testing.assert_close(one[:, 0], every[torch.arange(2), index], atol=ATOL, rtol=0)
    rows = torch.tensor([[0, 7, 7], [2, 1, 0]])                     # [B, R]: R positions a row, any order
    torch.testing.assert_close(rt.prefill(tokens, positions, rt.new_cache(), rows),
                               every[torch.arange(2)[:, None], rows], atol=ATOL, rtol=0)
    expected = r"logit_index \[8, 0\], expected \[2\] or \[2, R\] chunk positions in \[0, 8\)"
    with pytest.raises(dbrx_aot.DbrxAotError, match=expected):
        rt.prefill(tokens, positions, rt.new_cache(), torch.tensor([8, 0]))
