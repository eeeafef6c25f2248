"""Tensor parallelism (dbrx_aot/tp.py): the split table, the per-rank weights, and 2 gloo ranks on CPU
running the shared package against the whole model.

The tiny preset has 2 kv heads, so TP 2 leaves one kv head (and 2 query heads) per rank; the
second checkpoint (eager only) has 4 kv heads over 4 query heads, 2 per rank.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import TOLERANCE, make_checkpoint, parity_config, replace_config
from dbrx_aot import DbrxAotError, load_runtime
from dbrx_aot.checkpoint import iter_stored, stored_specs
from dbrx_aot.config import preset
from dbrx_aot.manifest import Manifest
from dbrx_aot.tp import check_tp, compile_world, shard, split_of

WORKER = Path(__file__).with_name("tp_worker.py")
TP_SHAPES = dict(batch_size=2, max_seq_len=64, prefill_chunk=8)
STEPS_PER_ROW = 32  # tp_worker.STEPS


@pytest.fixture(scope="session")
def tp_artifact(tiny_checkpoint, tmp_path_factory) -> Path:
    """The tiny preset at TP 2, fp32, aoti (batch 2: ragged batches), exported once per session;
    its prefill graph in the written-out attention (the other CPU artifacts' auto picks sdpa)."""
    from dbrx_aot.export import export_artifact

    return export_artifact(tiny_checkpoint, tmp_path_factory.mktemp("tp") / "tp2", formats="aoti", tp=2,
                           attention="math", progress=False, **TP_SHAPES).path


# -- the split table, without processes -------------------------------------------------------------


@pytest.mark.parametrize("name, split", [
    ("blocks.0.attn.Wqkv.weight", "qkv"), ("blocks.0.attn.Wqkv.scale", "qkv"),
    ("blocks.0.attn.out_proj.weight", 1), ("blocks.0.attn.out_proj.scale", None),
    ("blocks.1.ffn.w1", 1), ("blocks.1.ffn.w1_scale", 1), ("blocks.1.ffn.v1_scale", 1),
    ("blocks.1.ffn.w2", 1), ("blocks.1.ffn.w2_scale", None),
    ("lm_head.weight", 0), ("lm_head.scale", 0),
    ("wte.weight", None), ("blocks.0.ffn.router.weight", None), ("blocks.0.norm_1.weight", None),
])
def test_split_table(name, split):
    assert split_of(name) == split


@pytest.mark.parametrize("fmt", ["same", "int8"])
def test_shards_put_back_together_are_the_whole(tiny_checkpoint, fmt):
    """Every stored tensor (int8 scales included) cut for 2 ranks: each shard has the shape the
    rank's model expects, and the shards reassemble the whole (Wqkv by q, k and v rows)."""
    config = preset("tiny")
    specs = stored_specs(config, torch.float32, fmt, tp=2)
    q, kv = config.d_model, config.kv_n_heads * config.head_dim
    for name, tensor in iter_stored(tiny_checkpoint, config, torch.float32, fmt, progress=False):
        parts = [shard(name, tensor, r, 2, config) for r in range(2)]
        assert all(tuple(p.shape) == specs[name][0] and p.dtype == specs[name][1] for p in parts), name
        split = split_of(name)
        if split is None:
            assert all(p is tensor for p in parts)
        elif split == "qkv":
            halves = [p.split([q // 2, kv // 2, kv // 2]) for p in parts]
            whole = torch.cat([torch.cat([h[i] for h in halves]) for i in range(3)])
            assert torch.equal(whole, tensor), name
        else:
            assert torch.equal(torch.cat(parts, dim=split), tensor), name


def test_tp_degree_must_divide_heads_ffn_and_vocabulary():
    config = preset("tiny")
    with pytest.raises(DbrxAotError, match="does not divide the 2 kv heads"):
        check_tp(config, 4)
    with pytest.raises(DbrxAotError, match="expert ffn width"):
        check_tp(replace_config(config, kv_n_heads=4, n_heads=4, ffn_hidden_size=30), 4)
    with pytest.raises(DbrxAotError, match="vocabulary"):
        check_tp(replace_config(config, vocab_size=100001), 2)
    assert check_tp(config, 2) == 2


def test_export_refuses_onnx_and_bad_degrees(tiny_checkpoint, tmp_path):
    from dbrx_aot.export import export_artifact

    with pytest.raises(DbrxAotError, match="--format onnx with --tp 2"):
        export_artifact(tiny_checkpoint, tmp_path / "x", formats="aoti,onnx", tp=2, progress=False)
    with pytest.raises(DbrxAotError, match="--tp 3: 3 does not divide the 2 kv heads"):
        export_artifact(tiny_checkpoint, tmp_path / "x", tp=3, progress=False)
    assert not (tmp_path / "x").exists()
    with compile_world(2):  # a process group already up: export compiles in one process, outside any
        with pytest.raises(DbrxAotError, match="without torchrun"):
            export_artifact(tiny_checkpoint, tmp_path / "x", tp=2, progress=False)


def test_tp_artifact_layout(tp_artifact):
    """One package per graph for both ranks; each rank's weights in weights/rank-R/, checksummed;
    the caches are the rank's share of the kv heads."""
    m = Manifest.read(tp_artifact)
    assert (m.tp, m.tp_group, m.weights) == (2, "0", {})
    assert m.graphs["prefill"]["aoti_attention"] == m.graphs["decode"]["aoti_attention"] == "math"
    assert sorted(p.relative_to(tp_artifact).as_posix() for p in (tp_artifact / "aoti").iterdir()) == \
        ["aoti/decode.pt2", "aoti/prefill.pt2"]
    for rank in range(2):
        files = m.weight_files(rank)
        assert files == ["weights/rank-%d/model-00001-of-00003.safetensors" % rank,
                         "weights/rank-%d/model-00002-of-00003.safetensors" % rank,
                         "weights/rank-%d/model-00003-of-00003.safetensors" % rank]
        assert all(f in m.files for f in files)
    assert set(m.weights_of(0)) == set(m.weights_of(1)) == set(stored_specs(m.config, torch.float32, "same"))
    assert m.graphs["decode"]["inputs"][2]["shape"] == [2, 2, 1, 64, 16]


def test_tp_artifact_outside_torchrun_says_how_to_launch(tp_artifact):
    for runtime in ("aoti", "eager"):
        with pytest.raises(DbrxAotError, match=r"exported with --tp 2, launched without torchrun; run it as "
                                               r"`torchrun --nproc-per-node 2 -m dbrx_aot"):
            load_runtime(tp_artifact, runtime, progress=False)


# -- two gloo ranks ---------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def worker_env(**extra) -> dict:
    # One thread per rank: 2 ranks on 2 cores.
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(WORKER.parent), **extra}


def torchrun(*args, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           *map(str, args)], env=worker_env(), capture_output=True, text=True, timeout=timeout)


def test_tp2_matches_the_whole_model(tp_artifact, tiny_checkpoint, tmp_path):
    """aoti and eager at TP 2 against the unsharded eager model: logits over 3-chunk prefills and 32
    decode steps within the fp32 tolerance, greedy identical over a ragged batch; and int8 shards
    (the scales of out_proj and w2 replicated) against the whole int8 model."""
    other = make_checkpoint(tmp_path / "mha", parity_config("clip_none_mha"))  # 4 kv heads: 2 per rank
    out = tmp_path / "result.json"
    proc = torchrun(WORKER, "parity", tp_artifact, tiny_checkpoint, other, out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(out.read_text())
    for name, tol_key, cache in (("aoti", "aoti", [2, 2, 1, 64, 16]), ("eager", "eager", [2, 2, 1, 64, 16]),
                                 ("eager-other", "eager", [2, 2, 2, 64, 16]),
                                 ("eager-other-int8", "eager", [2, 2, 2, 64, 16])):
        r = results[name]
        assert r["cache"] == cache, name
        assert r["max_abs_error"] <= TOLERANCE[(tol_key, torch.float32)], (name, r)
        assert r["top1_agreement"] == 1.0 and r["greedy_first_difference"] is None, (name, r)
        assert r["positions"] >= 2 * STEPS_PER_ROW + 24, (name, r)  # prompts + 32 decode steps per row


def test_cli_under_torchrun_prints_once_and_matches_one_process(tp_artifact, tiny_checkpoint):
    prompt = "The quick brown fox"
    proc = torchrun("-m", "dbrx_aot", "--quiet", "generate", tp_artifact, "--runtime", "aoti", "--prompt", prompt,
                    "--max-new-tokens", "12")
    assert proc.returncode == 0, proc.stderr[-3000:]
    single = subprocess.run([sys.executable, "-m", "dbrx_aot", "--quiet", "generate", tiny_checkpoint, "--prompt",
                             prompt, "--max-new-tokens", "12"], env=worker_env(), capture_output=True, text=True,
                            timeout=120)
    assert single.returncode == 0, single.stderr
    assert proc.stdout == single.stdout and proc.stdout.strip()  # rank 0's text only, and the same text
    assert proc.stderr.count("tokens in") == 1  # the other rank prints nothing but errors


def test_world_size_mismatch_fails_on_every_rank(artifacts):
    """An artifact without --tp launched on 2 ranks: one line per rank, exit code 2."""
    proc = torchrun("-m", "dbrx_aot", "generate", artifacts["gather"], "--runtime", "aoti", "--prompt", "hi")
    assert proc.returncode != 0
    lines = [line for line in proc.stderr.splitlines() if "launched in a world of 2 ranks" in line]
    assert sorted(line.split(":")[0] for line in lines) == ["error", "error (rank 1)"], proc.stderr[-2000:]


@pytest.mark.parametrize("how", ["dead", "stall"])
def test_a_lost_rank_ends_the_others_within_the_timeout(tp_artifact, tmp_path, how):
    """Rank 1 exits (or stops) after one step; rank 0's next step fails with one line naming the
    cause, within DBRX_AOT_TP_TIMEOUT, instead of hanging. Launched without torchrun (whose agent
    would kill rank 0 itself), as a multi-node job's ranks are."""
    out = tmp_path / "result.json"
    env = worker_env(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), WORLD_SIZE="2", DBRX_AOT_TP_TIMEOUT="5")
    procs = [subprocess.Popen([sys.executable, str(WORKER), how, str(tp_artifact), str(out)],
                              env={**env, "RANK": str(r), "LOCAL_RANK": str(r)},
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True) for r in range(2)]
    try:
        procs[0].wait(timeout=120)
    finally:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGKILL)
                p.wait()
    assert procs[0].returncode == 0, procs[0].stderr.read()[-3000:]
    result = json.loads(out.read_text())
    assert result["error"] and "rank 0 of 2" in result["error"] and "DBRX_AOT_TP_TIMEOUT" in result["error"], result
    assert result["seconds"] < 30, result


def test_a_rank_leaves_its_world_at_exit():
    """Its process groups are destroyed by an exit hook, while the interpreter still runs: left to
    the interpreter's end, gloo's worker thread freeing a finished collective's tensors aborted
    about 1 `torchrun ... bench` in 7 (tp.leave_world). A hook registered before joining runs after
    that one (last in, first out) and sees no world."""
    code = ("import atexit, torch, torch.distributed as dist\n"
            "atexit.register(lambda: print('initialized at exit:', dist.is_initialized()))\n"
            "from dbrx_aot import tp\n"
            "tp.init_from_env('cpu')\n"
            "out = torch.empty(4)\n"
            "tp.all_gather_into(out, torch.arange(4.0), group=tp.python_group())\n"
            "print('gathered:', out.tolist())\n")
    env = worker_env(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), WORLD_SIZE="1", RANK="0", LOCAL_RANK="0")
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.splitlines() == ["gathered: [0.0, 1.0, 2.0, 3.0]", "initialized at exit: False"]


def test_memory_plan_per_rank():
    """The 132B at TP 1, 2, 4, 8 in bf16: the matrices split, wte and router replicated; bf16 fits
    2 x H200 or 4 x H100 and not fewer."""
    from dbrx_aot.inspection import preset_plans

    plans = {p["tp"]: p for p in preset_plans(preset("dbrx-132b"), "bfloat16") if p["weights_format"] == "same"}
    assert sorted(plans) == [1, 2, 4, 8]
    for tp, plan in plans.items():
        assert plan["bytes"]["embedding"] == plans[1]["bytes"]["embedding"]
        assert plan["bytes"]["experts"] * tp == plans[1]["bytes"]["experts"]
        assert plan["kv_bytes_per_token"] * tp == plans[1]["kv_bytes_per_token"]
    assert [plans[tp]["devices"]["H200 141GB"]["fits"] for tp in (1, 2)] == [False, True]
    assert [plans[tp]["devices"]["H100 80GB"]["fits"] for tp in (2, 4)] == [False, True]
    assert [p["tp"] for p in preset_plans(preset("tiny"), "float32") if p["weights_format"] == "same"] == [1, 2]


def test_inspect_shows_each_rank(tp_artifact):
    from dbrx_aot.inspection import describe, format_text

    info = describe(tp_artifact)
    assert info["per_rank"]["tp"] == 2 and info["per_rank"]["kv_cache_bytes"] == 2 * 2 * 2 * 1 * 64 * 16 * 4
    text = format_text(info)
    assert "2 ranks (torchrun), each: weights" in text
    assert "needs 2 ranks: torchrun --nproc-per-node 2 -m dbrx_aot" in text


def test_serve_is_refused_under_torchrun(tp_artifact, monkeypatch):
    from click.testing import CliRunner

    from dbrx_aot.cli import cli

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    result = CliRunner().invoke(cli, ["serve", str(tp_artifact)])
    assert result.exit_code == 2 and "serve runs in one process" in result.output, result.output


def test_chat_and_verify_under_torchrun(tp_artifact):
    """chat reads on rank 0 and every rank follows; verify compares aoti with eager, both sharded."""
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           "-m", "dbrx_aot", "--quiet", "chat", str(tp_artifact), "--runtime", "aoti", "--system", "Hi",
                           "--max-new-tokens", "4", "--temperature", "0.8"],
                          input="Hello\n/reset\nAgain\n", env=worker_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("dbrx> ") == 2 and proc.stdout.count("you> Hello") == 1, proc.stdout
    proc = torchrun("-m", "dbrx_aot", "--quiet", "verify", tp_artifact, "--steps", "8", "--json")
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout)
    assert [r["runtime"] for r in report["results"]] == ["aoti"] and report["within_tolerance"]
    assert report["results"][0]["greedy_first_difference"] is None


def test_compile_only_tp_artifact_has_no_weights(tp_artifact):
    """A --skip-weights TP manifest (no rank_weights): no weights to run, said on inspect and load."""
    import dataclasses

    from dbrx_aot.inspection import loadability

    m = dataclasses.replace(Manifest.read(tp_artifact), rank_weights=[])
    assert not m.has_weights() and m.weights_of(1) == {} and m.weight_files(1) == []
    assert loadability(m, tp_artifact)["aoti"] == "exported with --skip-weights: no weights"


def test_bench_under_torchrun(tp_artifact):
    """Each rank measures in its own process (no per-runtime subprocess outside the world), bytes
    per rank, the step's collectives timed alone; random weights are cut to each rank's shard."""
    proc = torchrun("-m", "dbrx_aot", "--quiet", "bench", tp_artifact, "--runtime", "aoti", "--random-weights", "0",
                    "--prompt-len", "8", "--new-tokens", "4", "--json")
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout)
    assert report["tp"] == 2 and report["collective_ms_per_decode_step"] > 0
    aoti = report["results"]["aoti"]
    assert aoti["decode_tokens_per_s"] > 0 and aoti["decode_bytes_by_part"]["kv_cache"] == 2 * 2 * 2 * 1 * 64 * 16 * 4
