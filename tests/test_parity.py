"""Eager model vs the independent reference, transformers' DbrxForCausalLM (test-only dependency)."""

from __future__ import annotations

import json

import pytest
import torch

import dbrx_aot
from conftest import PARITY_CASES, TOLERANCE

transformers = pytest.importorskip("transformers")

PROMPT_LEN = 21
GREEDY_STEPS = 16


def reference_model(path):
    """The oracle, with explicit rope_parameters and a huge clip where ours has none (FACTS.md)."""
    data = json.loads((path / "config.json").read_text())
    data["rope_parameters"] = {"rope_type": "default", "rope_theta": data["attn_config"]["rope_theta"]}
    if data["attn_config"]["clip_qkv"] is None:
        data["attn_config"]["clip_qkv"] = 1e30  # transformers crashes on None; same math
    config = transformers.DbrxConfig(**{k: v for k, v in data.items() if k not in ("architectures",)})
    model, info = transformers.DbrxForCausalLM.from_pretrained(path, config=config, dtype=torch.float32,
                                                               output_loading_info=True)
    assert not any(info.values()), info  # no missing / unexpected / mismatched keys
    return model.eval()


def prompt(vocab: int, seed: int) -> torch.Tensor:
    return torch.randint(0, vocab, (1, PROMPT_LEN), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("moe", ["dense", "gather"])
@pytest.mark.parametrize("case", list(PARITY_CASES))
def test_logits_and_greedy_match_transformers(parity_checkpoints, case, moe, record_property):
    path = parity_checkpoints[case]
    ref = reference_model(path)
    ours = dbrx_aot.load_runtime(path, "eager", max_seq_len=64, prefill_chunk=8, moe=moe, progress=False)
    ids = prompt(ours.config.vocab_size, seed=len(case))
    with torch.no_grad():
        expected = ref(ids).logits
    got = ours.logits(ids)
    err = (got - expected).abs().max().item()
    record_property("max_logit_error", err)
    print(f"\n{case} [{moe}] max |logit error| = {err:.2e} (logit scale {expected.abs().max():.2f})")
    assert err < TOLERANCE[("reference", torch.float32)]

    # Greedy continuations of 16 tokens: the reference recomputes the whole sequence each step,
    # ours uses its cache and decode graph.
    seq = ids
    with torch.no_grad():
        for _ in range(GREEDY_STEPS):
            nxt = ref(seq).logits[:, -1].argmax(-1, keepdim=True)
            seq = torch.cat([seq, nxt], dim=1)
    ours_new = dbrx_aot.generate(ours, ids.tolist(), max_new_tokens=GREEDY_STEPS, stop_ids=[])
    assert ours_new[0] == seq[0, PROMPT_LEN:].tolist()


def test_router_softmax_is_fp32_in_bf16():
    """The router's softmax runs in fp32 whatever the model dtype (transformers 5 uses the model dtype)."""
    from dbrx_aot.model import MoE
    from conftest import parity_config

    config = parity_config("base")
    moe = MoE(config).to(torch.bfloat16)
    torch.nn.init.normal_(moe.router.weight, std=0.5)
    h = torch.randn(5, config.d_model, dtype=torch.bfloat16)
    top_w, top_e = moe.route(h)
    probs = torch.softmax(moe.router(h).float(), -1)
    exp_w, exp_e = probs.topk(config.moe_top_k, -1)
    assert torch.equal(top_e, exp_e)
    assert torch.equal(top_w, (exp_w / exp_w.sum(-1, keepdim=True)).to(torch.bfloat16))


def test_peer_bench_times_transformers_on_a_checkpoint(parity_checkpoints, capsys):
    """scripts/peer_bench.py: the peer's side of issue 13's comparison runs on a real checkpoint."""
    from conftest import load_script

    peer_bench = load_script("peer_bench")
    assert peer_bench.main([str(parity_checkpoints["base"]), "--prompt-len", "8", "--new-tokens", "2",
                            "--repeats", "1", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["runtime"].startswith("transformers ") and result["prompt_len"] == 8
    assert min(result["prefill_tokens_per_s"], result["prefill_all_logits_tokens_per_s"],
               result["decode_tokens_per_s"]) > 0
