"""`dbrx-aot serve`: the scheduler's slots, and the OpenAI API end to end through the official client.

One tiny-preset AOTInductor artifact with B = 4 rows (S = 320, P = 16), exported once per session.
Servers run as subprocesses on 127.0.0.1, on a port they pick; every wait is bounded.
"""

from __future__ import annotations

import http.client
import json
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

# The serving stack is this suite's (pyproject's test extra); a bare GPU image without it (where
# `make gpu-check` runs `pytest -m gpu` over every file) skips this file instead of failing collection.
for _module in ("fastapi", "uvicorn", "prometheus_client"):
    pytest.importorskip(_module, reason=f"{_module} is not installed (dbrx-aot serve needs it)")
openai = pytest.importorskip("openai", reason="the openai client is not installed (the test extra)")
from click.testing import CliRunner

from serve_process import Server, next_event, open_stream, reference, reference_text, request

from dbrx_aot.cli import cli
from dbrx_aot.runtimes import PAD_TOKEN, load_runtime
from dbrx_aot.server import Failed, Finished, Job, QueueFull, Sampling, Scheduler, TextOut, Token
from dbrx_aot.tokenizer import Tokenizer

SHAPES = dict(batch_size=4, max_seq_len=320, prefill_chunk=16)
B, S, P = SHAPES["batch_size"], SHAPES["max_seq_len"], SHAPES["prefill_chunk"]
SYSTEM = {"role": "system", "content": "Be brief."}  # the default system prompt alone is 200+ tokens
PROMPTS = ["Hello", "The capital of France is", "def fib(n):", "A mixture of experts routes each token to",
           "Once upon a time, in a land far away, there lived a king who had three daughters and a dog",
           "1, 2, 3, 4, 5,", "Q: What is DBRX?\nA:", "SELECT * FROM", "import torch\n",
           "The quick brown fox jumps over the lazy dog. " * 3, "Bonjour", "<|im_start|> is plain text here"]


@pytest.fixture(scope="session")
def serve_artifact(tiny_checkpoint, tmp_path_factory) -> Path:
    from dbrx_aot.export import export_artifact

    return export_artifact(tiny_checkpoint, tmp_path_factory.mktemp("serve") / "tiny-b4", formats="aoti",
                           progress=False, **SHAPES).path


@pytest.fixture(scope="module")
def runtime(serve_artifact):
    return load_runtime(serve_artifact, runtime="aoti", progress=False)


@pytest.fixture(scope="module", params=["aoti", "eager"])
def slot_runtime(request, serve_artifact, runtime):
    """The slot tests run on the compiled graphs and on the eager model of the same artifact."""
    return runtime if request.param == "aoti" else load_runtime(serve_artifact, runtime="eager", progress=False)


# --- The scheduler, in-process ------------------------------------------------------------------

def test_padding_rule_leaves_other_rows_alone(slot_runtime):
    """Row 0 decodes; in between, row 1 is prefilled (row 0 fed positions pos.. as the scheduler does)
    and row 1 sits mid-prompt in a decode call (fed its next chunk's start). Row 0's logits are
    bitwise those of row 0 decoding with nothing else going on, including at the cache's end."""
    rt = slot_runtime
    prompt = list(range(1000, 1020))  # 20 tokens: two prefill chunks

    def run(interleave: bool, offset: int) -> list[torch.Tensor]:
        cache = rt.new_cache()
        arange = torch.arange(P)
        free = torch.zeros(B, P, dtype=torch.int64)  # free rows: anything
        for start in range(0, len(prompt), P):
            tokens = torch.full((B, P), PAD_TOKEN)
            seg = prompt[start:start + P]
            tokens[0, :len(seg)] = torch.tensor(seg)
            positions = free.clone()
            positions[0] = (offset + start + arange).clamp(max=S - 1)
            rt.prefill(tokens, positions, cache)
        pos, out = offset + len(prompt), []
        nxt = 7
        for step in range(6):
            if interleave and step in (1, 3):  # row 1's prompt chunk; row 0 fed junk at pos..pos+P-1
                tokens = torch.full((B, P), 3)
                positions = free.clone()
                positions[0] = (pos + arange).clamp(max=S - 1)
                positions[1] = arange + (0 if step == 1 else P)
                rt.prefill(tokens, positions, cache)
            tokens = torch.full((B, 1), 5)
            tokens[0, 0] = nxt
            positions = torch.zeros(B, 1, dtype=torch.int64)
            positions[0, 0] = min(pos, S - 1)
            positions[1, 0] = P if interleave and step in (1, 2) else 0  # row 1 between its chunks
            logits = rt.decode(tokens, positions, cache)[0, 0]
            out.append(logits.clone())
            nxt = int(logits.argmax())
            pos += 1
        return out

    for offset in (0, S - len(prompt) - 6):  # from the start, and up to the last cache slot
        alone, beside = run(False, offset), run(True, offset)
        for step, (a, b) in enumerate(zip(alone, beside)):
            assert torch.equal(a, b), f"offset {offset}, decode step {step}: max diff {(a - b).abs().max()}"


def collect(job_events: list) -> tuple[list[int], Finished]:
    ids = [e.id for e in job_events if isinstance(e, Token)]
    ends = [e for e in job_events if not isinstance(e, Token)]
    assert len(ends) == 1 and isinstance(ends[0], Finished), job_events
    return ids, ends[0]


def test_scheduler_matches_generate_alone(slot_runtime):
    """Jobs arrive while others decode (multi-chunk prompts prefilled between decode steps), queue
    when the 4 rows are full, and each one's greedy ids equal generate() on that prompt alone."""
    rt = slot_runtime
    prompts = [rt.tokenizer.encode(p) for p in PROMPTS[:7]]
    prompts[4] = prompts[4] + prompts[2] * 3  # > 2 chunks
    max_tokens = [12, 8, 12, 5, 10, 12, 3]
    scheduler = Scheduler(rt, max_queue=8)
    events: list[list] = [[] for _ in prompts]
    jobs = [Job(p, Sampling(max_tokens=m, temperature=0.0), events[n].append)
            for n, (p, m) in enumerate(zip(prompts, max_tokens))]
    arrivals = {0: [0, 1], 2: [2], 3: [3, 4, 5], 6: [6]}  # step -> jobs submitted before it
    for step in range(500):
        for n in arrivals.get(step, []):
            scheduler.submit(jobs[n])
        if step > max(arrivals) and all(any(isinstance(e, Finished) for e in ev) for ev in events):
            break
        scheduler.step()
        assert sum(s is not None for s in scheduler.rows) <= B
    else:
        pytest.fail("the scheduler did not finish 7 jobs in 500 steps")
    for n, prompt in enumerate(prompts):
        ids, end = collect(events[n])
        assert ids == reference(rt, prompt, max_tokens[n]), f"job {n}"
        assert end.completion_tokens == len(ids) and end.prompt_tokens == len(prompt)
        assert end.reason == ("stop" if ids[-1] in rt.tokenizer.eos_ids else "length")
    assert scheduler.rows == [None] * B
    assert scheduler.metrics.registry.get_sample_value("dbrx_aot_busy_rows") == 0


@pytest.mark.parametrize("window, prefills", [(0.5, 1), (0.0, 2)])
def test_jobs_arriving_together_share_one_prefill_call(runtime, monkeypatch, window, prefills):
    """A [B, P] prefill call costs the same for one row or B: a job admitted while rows are free
    waits up to the admission window for others to share its first call."""
    calls = []
    real = runtime.prefill
    monkeypatch.setattr(runtime, "prefill", lambda *args: calls.append(1) or real(*args))
    scheduler = Scheduler(runtime, max_queue=4, admission_window=window)
    events: list[list] = [[], []]
    jobs = [Job([1, 2, 3], Sampling(max_tokens=2, temperature=0.0), events[n].append) for n in range(2)]
    scheduler.submit(jobs[0])
    later = threading.Timer(0.05, scheduler.submit, args=(jobs[1],))
    later.start()
    scheduler.step()
    later.join()
    while any(not any(isinstance(e, Finished) for e in ev) for ev in events):
        scheduler.step()
    assert len(calls) == prefills
    assert collect(events[0])[0] == collect(events[1])[0]


def test_cancelled_job_frees_its_row(runtime):
    scheduler = Scheduler(runtime, max_queue=0)
    events: list = []
    jobs = [Job([1, 2, 3], Sampling(max_tokens=50, temperature=0.0), events.append) for _ in range(B)]
    for job in jobs:
        scheduler.submit(job)
    scheduler.step()
    assert all(s is not None for s in scheduler.rows)
    late = Job([4, 5], Sampling(max_tokens=50, temperature=0.0), events.append)
    with pytest.raises(QueueFull):  # B rows + 0 queue places: full
        scheduler.submit(late)
    jobs[2].cancel()
    scheduler.step()
    assert scheduler.rows[2] is None
    scheduler.submit(late)  # its place is free again
    scheduler.step()
    assert scheduler.rows[2] is not None and scheduler.rows[2].job is late


def test_a_failing_row_fails_alone(runtime):
    """A request whose text step raises (say, a sampled id the tokenizer cannot decode) ends with
    Failed; the request beside it still gets its reference ids."""
    scheduler = Scheduler(runtime, max_queue=0)
    events: list[list] = [[], []]
    prompts = [runtime.tokenizer.encode("Hello"), runtime.tokenizer.encode("def fib(n):")]
    for n, prompt in enumerate(prompts):
        scheduler.submit(Job(prompt, Sampling(max_tokens=6, temperature=0.0), events[n].append))
    scheduler.step()

    def broken(token):
        raise KeyError(token)

    scheduler.rows[0].text.push = broken
    for _ in range(20):
        scheduler.step()
    assert isinstance(events[0][-1], Failed) and events[0][-1].status == 500
    ids, _ = collect(events[1])
    assert ids == reference(runtime, prompts[1], 6)
    assert scheduler.rows == [None] * B


def test_text_out_holds_back_possible_stop_strings():
    tok = Tokenizer()
    text = "Hello world, this is the end of it."
    out = TextOut(tok, ("the end", "zzz"))
    released, stopped = "", False
    for t in tok.encode(text):
        piece, stopped = out.push(t)
        released += piece
        assert "the e" not in released  # never a piece of a stop string that may still complete
        if stopped:
            break
    assert stopped and released == "Hello world, this is "
    out = TextOut(tok, ("the",))
    pieces = [out.push(t) for t in tok.encode("and th")]
    assert "".join(p for p, _ in pieces) == "and " and out.finish() == ("th", False)


# --- The HTTP server, as a subprocess ------------------------------------------------------------

@pytest.fixture(scope="module")
def server(serve_artifact, tmp_path_factory):
    srv = Server(serve_artifact, tmp_path_factory.mktemp("logs") / "server.log", "--max-queue", "16")
    yield srv
    code = srv.terminate()
    assert code == 0, srv.log.read_text()[-2000:]


def test_chat_through_the_openai_client(server, runtime):
    client = server.client()
    messages = [SYSTEM, {"role": "user", "content": "What is a mixture of experts?"}]
    prompt = runtime.tokenizer.encode_chat(messages)
    expected = reference_text(runtime, prompt, 12)
    out = client.chat.completions.create(model="tiny-b4", messages=messages, max_tokens=12, temperature=0)
    choice = out.choices[0]
    assert out.object == "chat.completion" and out.model == "tiny-b4"
    assert choice.message.role == "assistant" and choice.message.content == expected
    assert choice.finish_reason in ("stop", "length")
    assert out.usage.prompt_tokens == len(prompt) and 1 <= out.usage.completion_tokens <= 12
    assert out.usage.total_tokens == out.usage.prompt_tokens + out.usage.completion_tokens

    chunks = list(client.chat.completions.create(model="tiny-b4", messages=messages, max_tokens=12, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == expected
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == choice.finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == out.usage.completion_tokens
    # Content parts and no model name are accepted too.
    parts = client.chat.completions.create(
        model="tiny-b4", max_tokens=12, temperature=0,
        messages=[SYSTEM, {"role": "user", "content": [{"type": "text", "text": "What is a mixture "},
                                                       {"type": "text", "text": "of experts?"}]}])
    assert parts.choices[0].message.content == expected


def test_completions_through_the_openai_client(server, runtime):
    client = server.client()
    text = "The capital of France is"
    ids = runtime.tokenizer.encode(text)
    expected = reference_text(runtime, ids, 10)
    out = client.completions.create(model="tiny-b4", prompt=text, max_tokens=10, temperature=0)
    assert out.object == "text_completion" and out.choices[0].text == expected
    assert out.usage.prompt_tokens == len(ids)
    by_ids = client.completions.create(model="tiny-b4", prompt=ids, max_tokens=10, temperature=0)
    assert by_ids.choices[0].text == expected
    chunks = list(client.completions.create(model="tiny-b4", prompt=text, max_tokens=10, temperature=0,
                                            stream=True))
    assert "".join(c.choices[0].text for c in chunks) == expected
    assert chunks[-1].choices[0].finish_reason == out.choices[0].finish_reason
    default = client.completions.create(model="tiny-b4", prompt=text, temperature=0)  # OpenAI's 16
    assert default.usage.completion_tokens <= 16


def test_stop_strings_and_max_tokens(server, runtime):
    client = server.client()
    prompt = "def fib(n):"
    full = reference_text(runtime, runtime.tokenizer.encode(prompt), 24)
    stop = full[len(full) // 2:len(full) // 2 + 3]
    assert len(stop) == 3 and full.find(stop) > 0, full
    out = client.completions.create(model="tiny-b4", prompt=prompt, max_tokens=24, temperature=0, stop=[stop, "\x00"])
    assert out.choices[0].text == full[:full.find(stop)] and out.choices[0].finish_reason == "stop"
    chunks = list(client.completions.create(model="tiny-b4", prompt=prompt, max_tokens=24, temperature=0, stop=stop,
                                            stream=True))
    assert "".join(c.choices[0].text for c in chunks) == full[:full.find(stop)]
    one = client.completions.create(model="tiny-b4", prompt=prompt, max_tokens=1, temperature=0)
    assert one.usage.completion_tokens == 1


def test_seeded_sampling_reproduces(server):
    client = server.client()
    kw = dict(model="tiny-b4", prompt="Once upon a time", max_tokens=12, temperature=1.0, top_p=0.9, seed=1234,
              extra_body={"top_k": 50})
    assert client.completions.create(**kw).choices[0].text == client.completions.create(**kw).choices[0].text


def test_concurrent_requests_each_match_alone(server):
    """3 x B requests at once (some streaming): every greedy result equals the request served alone."""
    client = server.client()

    def ask(n: int) -> str:
        kw = dict(model="tiny-b4", prompt=PROMPTS[n], max_tokens=10 + n % 3, temperature=0)
        if n % 2:
            return "".join(c.choices[0].text for c in client.completions.create(**kw, stream=True))
        return client.completions.create(**kw).choices[0].text

    alone = [ask(n) for n in range(3 * B)]
    before = server.metric("dbrx_aot_finished_requests_total")
    with ThreadPoolExecutor(3 * B) as pool:
        together = list(pool.map(ask, range(3 * B), timeout=300))
    assert together == alone
    assert server.metric("dbrx_aot_finished_requests_total") - before == 3 * B
    assert server.metric("dbrx_aot_busy_rows") == 0 and server.metric("dbrx_aot_queue_length") == 0


KILLED_CLIENT = """
import http.client, json, sys
stream = sys.argv[2] == "stream"
conn = http.client.HTTPConnection("127.0.0.1", int(sys.argv[1]), timeout=60)
conn.request("POST", "/v1/completions", body=json.dumps({"prompt": "Hello", "max_tokens": 280, "temperature": 0,
             "stream": stream}), headers={"Content-Type": "application/json"})
if not stream:
    print("waiting", flush=True)
resp = conn.getresponse()
while not resp.readline().startswith(b"data: "):
    pass
print("streaming", flush=True)
while resp.readline():
    pass
"""


@pytest.mark.parametrize("mode", ["stream", "whole"])
def test_client_killed_mid_request_frees_its_row(server, mode):
    cancelled = server.metric('dbrx_aot_finished_requests_total{reason="cancelled"}')
    client = subprocess.Popen([sys.executable, "-c", KILLED_CLIENT, str(server.port), mode], stdout=subprocess.PIPE,
                              text=True)
    try:
        assert client.stdout.readline().strip() == ("streaming" if mode == "stream" else "waiting")
        deadline = time.monotonic() + 30
        while server.metric("dbrx_aot_busy_rows") != 1:  # generating (stream: already is)
            assert time.monotonic() < deadline, "the request never took a row"
            time.sleep(0.05)
    finally:
        client.kill()
        client.wait(10)
    deadline = time.monotonic() + 30
    while server.metric('dbrx_aot_finished_requests_total{reason="cancelled"}') == cancelled:
        assert time.monotonic() < deadline, "the killed client's row was never freed"
        time.sleep(0.05)
    assert server.metric("dbrx_aot_busy_rows") == 0
    out = server.client().completions.create(model="tiny-b4", prompt="Hello", max_tokens=3, temperature=0)
    assert out.usage.completion_tokens >= 1


def chat_body(**changes) -> dict:
    body = {"model": "tiny-b4", "messages": [SYSTEM, {"role": "user", "content": "Hi"}], "max_tokens": 4}
    body.update(changes)
    return {k: v for k, v in body.items() if v is not ...}


BAD_INPUTS = [
    # (path, body, status, param, fragment of the message)
    ("/v1/chat/completions", b"{not json", 400, None, "not valid JSON"),
    ("/v1/chat/completions", b"[1, 2]", 400, None, "JSON object"),
    ("/v1/chat/completions", chat_body(messages=...), 400, "messages", "required"),
    ("/v1/chat/completions", chat_body(messages=[]), 400, "messages", "at least 1"),
    ("/v1/chat/completions", chat_body(messages="Hi"), 400, "messages", "list"),
    ("/v1/chat/completions", chat_body(messages=[{"role": "user"}]), 400, "messages.0.content", "required"),
    ("/v1/chat/completions", chat_body(messages=[{"role": "robot", "content": "x"}]), 400, "messages.0.role", ""),
    ("/v1/completions", {"model": "tiny-b4", "max_tokens": 4}, 400, "prompt", "required"),
    ("/v1/completions", {"prompt": 5}, 400, "prompt", ""),
    ("/v1/completions", {"prompt": ""}, 400, "prompt", "empty"),
    ("/v1/completions", {"prompt": [1, 200000]}, 400, "prompt", "[0, 100352)"),
    ("/v1/chat/completions", chat_body(max_tokens="4"), 400, "max_tokens", "integer"),
    ("/v1/chat/completions", chat_body(max_tokens=4.0), 400, "max_tokens", "integer"),
    ("/v1/chat/completions", chat_body(max_tokens=0), 400, "max_tokens", "greater than or equal to 1"),
    ("/v1/chat/completions", chat_body(max_tokens=-3), 400, "max_tokens", ""),
    ("/v1/chat/completions", chat_body(max_tokens=S), 400, "max_tokens", f"is {S} tokens"),
    ("/v1/completions", {"prompt": "x " * (S + 10)}, 400, "prompt", f"is {S} tokens"),
    ("/v1/chat/completions", chat_body(model="gpt-4"), 404, "model", "gpt-4"),
    ("/v1/chat/completions", chat_body(temperature=-0.5), 400, "temperature", "greater than or equal to 0"),
    ("/v1/chat/completions", chat_body(temperature="hot"), 400, "temperature", ""),
    ("/v1/chat/completions", chat_body(top_p=0), 400, "top_p", "greater than 0"),
    ("/v1/chat/completions", chat_body(top_p=1.5), 400, "top_p", "less than or equal to 1"),
    ("/v1/chat/completions", chat_body(top_k=0), 400, "top_k", ""),
    ("/v1/chat/completions", chat_body(n=2), 400, "n", "n=1"),
    ("/v1/chat/completions", chat_body(stream="yes"), 400, "stream", "boolean"),
    ("/v1/chat/completions", chat_body(stop=["a", "b", "c", "d", "e"]), 400, "stop", "up to 4"),
    ("/v1/chat/completions", chat_body(stop=[""]), 400, "stop", "non-empty"),
    ("/v1/chat/completions", chat_body(seed="1"), 400, "seed", ""),
    ("/v1/chat/completions", chat_body(seed=1 << 64), 400, "seed", "less than or equal to"),
    ("/v1/chat/completions", json.dumps(chat_body(temperature=0.5)).replace("0.5", "NaN"), 400, "temperature", ""),
    ("/v1/chat/completions", chat_body(logprobs=True), 400, "logprobs", "not supported"),
    ("/v1/chat/completions", json.dumps(chat_body(messages=[SYSTEM, {"role": "user", "content": "x" * (1 << 20)}])),
     413, None, "limit"),
    ("/v1/nothing", chat_body(), 404, None, "Not Found"),
]


@pytest.mark.parametrize("path, body, status, param, fragment", BAD_INPUTS,
                         ids=[f"{n}-{b[2]}" for n, b in enumerate(BAD_INPUTS)])
def test_bad_input_is_an_openai_error(server, path, body, status, param, fragment):
    payload = body if isinstance(body, (bytes, str)) else json.dumps(body)
    code, raw, _ = request(server.port, "POST", path, payload)
    assert code == status, raw
    error = json.loads(raw)["error"]
    assert set(error) == {"message", "type", "param", "code"} and fragment in error["message"], error
    assert error["param"] == param or (param and error["param"].startswith(param)), error


def test_server_survives_bad_input_and_reports(server):
    code, raw, _ = request(server.port, "GET", "/v1/chat/completions")
    assert code == 405 and "error" in json.loads(raw)
    out = server.client().chat.completions.create(model="tiny-b4", messages=[SYSTEM, {"role": "user", "content": "Hi"}],
                                                  max_tokens=3, temperature=0)
    assert out.usage.completion_tokens >= 1
    models = server.client().models.list()
    assert [m.id for m in models.data] == ["tiny-b4"]
    code, raw, _ = request(server.port, "GET", "/health")
    assert code == 200 and json.loads(raw)["rows"] == B
    assert server.metric('dbrx_aot_requests_total{endpoint="/v1/chat/completions",status="400"}') > 0
    code, raw, resp = request(server.port, "GET", "/metrics")
    text = raw.decode()
    for name in ("dbrx_aot_requests_total", "dbrx_aot_queue_length", "dbrx_aot_busy_rows",
                 "dbrx_aot_generated_tokens_total", "dbrx_aot_time_to_first_token_seconds_bucket",
                 "dbrx_aot_inter_token_latency_seconds_bucket"):
        assert name in text, name
    assert server.metric("dbrx_aot_generated_tokens_total") > 0
    assert server.metric("dbrx_aot_inter_token_latency_seconds_count") > 0


def test_queue_limit_answers_429(serve_artifact, tmp_path):
    srv = Server(serve_artifact, tmp_path / "server.log", "--max-queue", "1")
    streams = []
    try:
        body = {"prompt": "Hello", "max_tokens": 280, "temperature": 0}
        for _ in range(B):  # every row busy for a few hundred steps
            conn, resp = open_stream(srv.port, "/v1/completions", body)
            assert resp.status == 200 and isinstance(next_event(resp), dict)
            streams.append(conn)
        conn, resp = open_stream(srv.port, "/v1/completions", body)  # the one queue place
        assert resp.status == 200
        streams.append(conn)
        code, raw, resp = request(srv.port, "POST", "/v1/completions", json.dumps(body))
        assert code == 429 and resp.getheader("Retry-After") == "1"
        assert json.loads(raw)["error"]["code"] == "rate_limit_exceeded"
        assert srv.metric("dbrx_aot_queue_length") == 1 and srv.metric("dbrx_aot_busy_rows") == B
        for conn in streams:
            conn.close()
        streams = []
        out = srv.client().completions.create(model="tiny-b4", prompt="Hi", max_tokens=2, temperature=0)
        assert out.usage.completion_tokens >= 1
    finally:
        for conn in streams:
            conn.close()
        assert srv.terminate() == 0


def test_sigterm_drains_then_exits_0(serve_artifact, tmp_path):
    """SIGTERM: no new connections; in-flight requests (queued ones too) go on until --grace, then
    the rest are cut; the process exits 0."""
    srv = Server(serve_artifact, tmp_path / "server.log", "--grace", "1")
    conns = []
    try:
        conn, short = open_stream(srv.port, "/v1/completions", {"prompt": "Hi", "max_tokens": 8, "temperature": 0})
        conns.append(conn)
        assert isinstance(next_event(short), dict)
        # 3 more rows and 8 queued, 300 tokens each: hundreds of decode steps, seconds even for this model.
        longs = []
        for _ in range(11):
            conn, resp = open_stream(srv.port, "/v1/completions", {"prompt": "Hello", "max_tokens": 300,
                                                                   "temperature": 0})
            assert resp.status == 200
            conns.append(conn)
            longs.append(resp)
        start = time.monotonic()
        srv.proc.send_signal(signal.SIGTERM)
        events = []
        while (event := next_event(short)) is not None:
            events.append(event)
        assert events[-1] == "[DONE]" and events[-2]["choices"][0]["finish_reason"] in ("stop", "length")
        while True:  # no longer accepting, while still draining the long requests
            try:
                socket.create_connection(("127.0.0.1", srv.port), timeout=5).close()
            except ConnectionRefusedError:
                break
            assert time.monotonic() - start < 10, "still accepting connections 10 s after SIGTERM"
            time.sleep(0.02)
        assert srv.proc.poll() is None, "exited before the 1 s grace period was over"
        assert srv.proc.wait(timeout=30) == 0  # no second signal: one SIGTERM is enough
        assert 0.9 <= time.monotonic() - start < 20
        assert "Application shutdown complete" in srv.log.read_text()
        ends = []
        for resp in longs:
            try:
                while (event := next_event(resp)) not in (None, "[DONE]"):
                    pass
            except (http.client.IncompleteRead, ConnectionError):
                event = None
            ends.append(event)
        assert None in ends, "3300 tokens on 4 rows finished within a 1 s grace period?"
    finally:
        for conn in conns:
            conn.close()
        if srv.proc.poll() is None:
            srv.kill()


def one_line_error(result, fragment: str) -> None:
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and fragment in lines[0], result.output


def test_cli_errors_are_one_line(tmp_path, serve_artifact):
    one_line_error(CliRunner().invoke(cli, ["serve", str(tmp_path / "absent"), "--port", "0"]), "no such file")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        one_line_error(CliRunner().invoke(cli, ["serve", str(serve_artifact), "--port", str(port)]),
                       f"--port {port}: cannot listen")
    one_line_error(CliRunner().invoke(cli, ["serve", str(serve_artifact), "--max-queue", "-1"]), "--max-queue -1")
