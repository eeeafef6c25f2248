"""``dbrx-aot serve``: an OpenAI-compatible HTTP server over one runtime, with continuous batching.

One scheduler loop (a thread) owns the runtime and one KV cache of B rows; each row is a slot.
A request waits in a FIFO queue until a row is free, is prefilled into that row chunk by chunk
(one prefill call per loop iteration, so rows already decoding keep going between chunks) and then
joins the batched decode step; a row is freed the moment its request finishes or its client goes.

Why rows do not disturb each other (the model's padding rule): a call reads a row's cache slots
j < positions[b, 0] plus the call's own keys, and writes its keys at the positions it is given.
So a row with nothing to contribute to a call is fed positions starting at the next position it
will feed itself: the junk it writes lands at or after that position, and its own next call
rewrites each such slot before any query of the row can read it. A decoding row in a prefill call
gets positions pos, pos+1, ... (clamped to S-1); a row between prefill chunks gets its next
chunk's start in a decode call; a free row gets anything. A greedy request therefore yields the
same ids whatever shares the batch with it, in any row.

The HTTP side (FastAPI on uvicorn) validates requests, tokenizes, and turns the scheduler's events
into OpenAI responses; bad input is an OpenAI-style JSON error, never a 500.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import logging
import signal
import socket
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal, Union

import torch
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from dbrx_aot.app import checksum_option
from dbrx_aot.errors import DbrxAotError
from dbrx_aot.generate import sample
from dbrx_aot.runtimes import PAD_TOKEN, Runtime, load_runtime
from dbrx_aot.tokenizer import TextStream, Tokenizer

log = logging.getLogger("dbrx_aot.server")

MAX_BODY_BYTES = 1 << 20    # a request body beyond this is answered 413
COMPLETION_MAX_TOKENS = 16  # OpenAI's default max_tokens for /v1/completions; chat defaults to the rest of the cache
MAX_STOP_STRINGS = 4        # as OpenAI
# How long a newly admitted job waits for others to share its first prefill call (Scheduler.step):
# a few ms of latency against a [B, P] prefill call saved (0.4 s for the small preset on 2 cores).
ADMISSION_WINDOW_S = 0.02


# --- The scheduler's side: jobs, events, text --------------------------------------------------

@dataclass(frozen=True)
class Sampling:
    max_tokens: int
    temperature: float = 1.0
    top_p: float | None = None
    top_k: int | None = None
    seed: int | None = None
    stop: tuple[str, ...] = ()


@dataclass(frozen=True)
class Token:
    """One generated id and the text it releases (may be empty: incomplete UTF-8, a possible stop string)."""

    id: int
    text: str


@dataclass(frozen=True)
class Finished:
    reason: Literal["stop", "length"]
    prompt_tokens: int
    completion_tokens: int


@dataclass(frozen=True)
class Failed:
    message: str
    status: int  # 503 shutting down, 500 the runtime failed


Event = Union[Token, Finished, Failed]


@dataclass(eq=False)
class Job:
    """A request as the scheduler sees it. ``on_event`` is called from the scheduler thread."""

    prompt: list[int]
    sampling: Sampling
    on_event: Callable[[Event], None]
    arrival: float = field(default_factory=time.perf_counter)
    cancelled: bool = False

    def cancel(self) -> None:
        """The client went away: the scheduler drops the job (or frees its row) at its next step."""
        self.cancelled = True


class QueueFull(Exception):
    pass


class ShuttingDown(Exception):
    pass


class TextOut:
    """A request's text: UTF-8 completed across tokens, stop strings cut, and any tail that could
    still grow into a stop string held back until it cannot."""

    def __init__(self, tokenizer: Tokenizer, stops: tuple[str, ...]):
        self.stream = TextStream(tokenizer)
        self.stops = stops
        self.held = ""

    def push(self, token: int) -> tuple[str, bool]:
        """-> (text to release, whether a stop string was reached)."""
        return self._release(self.held + self.stream.push(token), final=False)

    def finish(self) -> tuple[str, bool]:
        return self._release(self.held + self.stream.flush(), final=True)

    def _release(self, text: str, final: bool) -> tuple[str, bool]:
        found = [i for i in (text.find(s) for s in self.stops) if i >= 0]
        if found:
            self.held = ""
            return text[:min(found)], True
        keep = 0 if final else max((n for s in self.stops for n in range(1, len(s))
                                    if text.endswith(s[:n])), default=0)
        self.held = text[len(text) - keep:] if keep else ""
        return text[:len(text) - keep], False


@dataclass(eq=False)
class Slot:
    """A row of the batch holding a job."""

    job: Job
    text: TextOut
    generator: torch.Generator
    fed: int = 0             # prompt tokens prefilled so far
    pos: int = 0             # the position the next id will be fed at (once the prompt is in)
    next_id: int = PAD_TOKEN  # the last chosen id, fed by the next decode step
    generated: int = 0
    last_token_at: float = 0.0

    @property
    def prefilling(self) -> bool:
        return self.fed < len(self.job.prompt)


class Metrics:
    """The server's Prometheus instruments, in a registry of its own."""

    def __init__(self, batch_size: int):
        r = self.registry = CollectorRegistry()
        self.requests = Counter("dbrx_aot_requests", "HTTP requests by endpoint and status code",
                                ["endpoint", "status"], registry=r)
        self.finished = Counter("dbrx_aot_finished_requests", "Generation requests ended, by reason "
                                "(stop, length, cancelled: the client went away, failed)", ["reason"], registry=r)
        self.queue_length = Gauge("dbrx_aot_queue_length", "Requests waiting for a free row", registry=r)
        self.busy_rows = Gauge("dbrx_aot_busy_rows", "Rows of the batch holding a request", registry=r)
        self.rows = Gauge("dbrx_aot_rows", "Rows of the batch (B, fixed at export)", registry=r)
        self.rows.set(batch_size)
        self.prompt_tokens = Counter("dbrx_aot_prompt_tokens", "Prompt tokens prefilled", registry=r)
        self.generated_tokens = Counter("dbrx_aot_generated_tokens", "Tokens generated", registry=r)
        self.ttft = Histogram("dbrx_aot_time_to_first_token_seconds", "From a request's arrival to its first token",
                              buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60), registry=r)
        self.itl = Histogram("dbrx_aot_inter_token_latency_seconds", "Between consecutive tokens of a request",
                             buckets=(0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5), registry=r)


class Scheduler:
    """One loop owning the runtime and one KV cache of B rows (continuous batching).

    ``submit`` may be called from any thread; everything else runs on the loop's thread (or, in
    tests, on the caller's: ``step`` is one iteration).
    """

    def __init__(self, runtime: Runtime, max_queue: int, metrics: Metrics | None = None,
                 admission_window: float = ADMISSION_WINDOW_S):
        self.runtime = runtime
        self.max_queue = max_queue
        self.admission_window = admission_window
        self.metrics = metrics or Metrics(runtime.batch_size)
        self.cache = runtime.new_cache()
        self.rows: list[Slot | None] = [None] * runtime.batch_size
        self.stop_ids = frozenset(runtime.tokenizer.eos_ids)
        self._waiting: collections.deque[Job] = collections.deque()
        self._in_flight = 0  # waiting + in rows, guarded by _cond
        self._cond = threading.Condition()
        self._stopping = False
        self._thread: threading.Thread | None = None

    # Any thread.
    def submit(self, job: Job) -> None:
        """Queue a job; QueueFull when B rows and max_queue waiting places are all taken."""
        with self._cond:
            if self._stopping:
                raise ShuttingDown()
            if self._in_flight >= self.runtime.batch_size + self.max_queue:
                raise QueueFull()
            self._in_flight += 1
            self._waiting.append(job)
            self.metrics.queue_length.set(len(self._waiting))
            self._cond.notify()

    def start(self) -> None:
        self._thread = threading.Thread(target=self.run, name="dbrx-aot-scheduler", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        """Stop the loop; jobs still queued or in rows get Failed (503)."""
        with self._cond:
            self._stopping = True
            self._cond.notify()
        if self._thread is not None:
            self._thread.join(timeout)

    def run(self) -> None:
        while True:
            with self._cond:
                while not self._stopping and not self._waiting and not any(self.rows):
                    self._cond.wait()
                if self._stopping:
                    break
            try:
                self.step()
            except Exception as err:  # never a dead server: fail the rows' requests, keep serving
                log.exception("scheduler step failed")
                for b, slot in enumerate(self.rows):
                    if slot is not None:
                        self._end(b, Failed(f"the runtime failed: {err}", 500), "failed")
        with self._cond:
            waiting, self._waiting = list(self._waiting), collections.deque()
        for job in waiting:
            self._deliver(job, Failed("the server is shutting down", 503))
            self._count_end("failed")
        for b, slot in enumerate(self.rows):
            if slot is not None:
                self._end(b, Failed("the server is shutting down", 503), "failed")

    # The loop's thread.
    @torch.inference_mode()
    def step(self) -> None:
        """One iteration: free rows of cancelled jobs, admit waiting jobs into free rows, one
        prefill call for the rows still taking in their prompt, one decode call for the rest.

        A prefill call costs the same whatever number of rows it fills (its shape is [B, P]), so a
        job admitted while rows are still free waits up to ``admission_window`` seconds for
        others to share its first call: requests that arrive together (a burst, or clients whose
        previous requests ended on the same step) pay for one prefill, not one each, and the rows
        already decoding are stalled once."""
        if self._admit() and self.admission_window > 0 and None in self.rows:
            self._await_arrivals(self.admission_window)
            self._admit()
        if any(s is not None and s.prefilling for s in self.rows):
            self._prefill()
        if any(s is not None and not s.prefilling for s in self.rows):
            self._decode()

    def _await_arrivals(self, window: float) -> None:
        """Wait until the free rows have waiting jobs to take, or ``window`` seconds have passed."""
        deadline = time.monotonic() + window
        with self._cond:
            while not self._stopping and len(self._waiting) < self.rows.count(None):
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                self._cond.wait(remaining)

    def _admit(self) -> int:
        """Free the rows of cancelled jobs and fill free rows from the queue; returns how many were admitted."""
        admitted = 0
        for b, slot in enumerate(self.rows):
            if slot is not None and slot.job.cancelled:
                self._end(b, None, "cancelled")
        with self._cond:
            for job in [j for j in self._waiting if j.cancelled]:
                self._waiting.remove(job)
                self._in_flight -= 1
                self.metrics.finished.labels("cancelled").inc()
            for b in range(len(self.rows)):
                if self.rows[b] is None and self._waiting:
                    job = self._waiting.popleft()
                    generator = torch.Generator(device=self.runtime.device)
                    if job.sampling.seed is not None:
                        generator.manual_seed(job.sampling.seed)
                    else:
                        generator.seed()
                    self.rows[b] = Slot(job, TextOut(self.runtime.tokenizer, job.sampling.stop), generator)
                    admitted += 1
            self.metrics.queue_length.set(len(self._waiting))
        self.metrics.busy_rows.set(sum(s is not None for s in self.rows))
        return admitted

    def _prefill(self) -> None:
        rt = self.runtime
        B, P, S = rt.batch_size, rt.prefill_chunk, rt.max_seq_len
        tokens = torch.full((B, P), PAD_TOKEN, dtype=torch.int64)
        starts = torch.zeros(B, dtype=torch.int64)
        chunk: dict[int, int] = {}  # row -> prompt tokens in this call
        for b, slot in enumerate(self.rows):
            if slot is None:
                continue  # a free row: its slots are rewritten before a future job reads them
            if slot.prefilling:
                seg = slot.job.prompt[slot.fed:slot.fed + P]
                tokens[b, :len(seg)] = torch.as_tensor(seg, dtype=torch.int64)
                starts[b] = slot.fed
                chunk[b] = len(seg)
            else:
                starts[b] = slot.pos  # a decoding row: junk only at slots it rewrites before reading
        positions = (starts[:, None] + torch.arange(P)).clamp(max=S - 1)  # [B, P]
        index = torch.tensor([chunk.get(b, 1) - 1 for b in range(B)])       # each row's last prompt token here
        logits = rt.prefill(tokens, positions, self.cache, index)          # [B, 1, V]
        done = []
        for b, n in chunk.items():
            slot = self.rows[b]
            slot.fed += n
            self.metrics.prompt_tokens.inc(n)
            if not slot.prefilling:
                slot.pos = slot.fed
                done.append(b)
        if done:
            ids = self._sample(done, torch.stack([logits[b, 0] for b in done]))
            for b, token in zip(done, ids):
                self._emit_isolated(b, token)

    def _decode(self) -> None:
        rt = self.runtime
        B, S = rt.batch_size, rt.max_seq_len
        tokens = torch.full((B, 1), PAD_TOKEN, dtype=torch.int64)
        positions = torch.zeros((B, 1), dtype=torch.int64)
        rows = []
        for b, slot in enumerate(self.rows):
            if slot is None:
                continue
            if slot.prefilling:
                positions[b, 0] = slot.fed  # its next chunk rewrites this slot before reading it
            else:
                tokens[b, 0] = slot.next_id
                positions[b, 0] = min(slot.pos, S - 1)
                rows.append(b)
        logits = rt.decode(tokens, positions, self.cache)[:, 0]  # [B, V]
        for b in rows:
            self.rows[b].pos += 1
        ids = self._sample(rows, logits[rows])
        for b, token in zip(rows, ids):
            self._emit_isolated(b, token)

    def _sample(self, rows: list[int], logits: torch.Tensor) -> list[int]:
        """Each row with its own request's settings and generator; logits [len(rows), V] stay on the device."""
        chosen = []
        for i, b in enumerate(rows):
            s = self.rows[b].job.sampling
            chosen.append(sample(logits[i:i + 1].float(), s.temperature, s.top_k, s.top_p, self.rows[b].generator))
        return torch.cat(chosen).tolist()

    def _emit_isolated(self, b: int, token: int) -> None:
        """A request whose token cannot be turned into text fails alone; the other rows go on."""
        try:
            self._emit(b, token)
        except Exception as err:
            log.exception("row %d: token %d", b, token)
            if self.rows[b] is not None:
                self._end(b, Failed(f"generation failed at token {token}: {type(err).__name__}: {err}", 500),
                          "failed")

    def _emit(self, b: int, token: int) -> None:
        slot = self.rows[b]
        job = slot.job
        now = time.perf_counter()
        if slot.generated == 0:
            self.metrics.ttft.observe(now - job.arrival)
        else:
            self.metrics.itl.observe(now - slot.last_token_at)
        slot.generated += 1
        slot.last_token_at = now
        slot.next_id = token
        self.metrics.generated_tokens.inc()
        finished = None
        if token in self.stop_ids:
            text, _ = slot.text.finish()
            finished = "stop"
        else:
            text, stopped = slot.text.push(token)
            if stopped:
                finished = "stop"
            elif slot.generated >= job.sampling.max_tokens or slot.pos >= self.runtime.max_seq_len:
                tail, stopped = slot.text.finish()
                text += tail
                finished = "stop" if stopped else "length"
        self._deliver(job, Token(token, text))
        if finished is not None:
            self._end(b, Finished(finished, len(job.prompt), slot.generated), finished)

    def _end(self, b: int, event: Event | None, reason: str) -> None:
        job = self.rows[b].job
        self.rows[b] = None
        self.metrics.busy_rows.set(sum(s is not None for s in self.rows))
        self._count_end(reason)  # before the event: a client that sees its end sees the row free
        if event is not None:
            self._deliver(job, event)

    def _count_end(self, reason: str) -> None:
        with self._cond:
            self._in_flight -= 1
        self.metrics.finished.labels(reason).inc()

    @staticmethod
    def _deliver(job: Job, event: Event) -> None:
        try:
            job.on_event(event)
        except Exception:  # a consumer that cannot take it (its event loop closed) is gone
            log.debug("dropped an event for a finished consumer", exc_info=True)


# --- The HTTP side -------------------------------------------------------------------------------

class ApiError(Exception):
    """An OpenAI-style error response: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type

    def response(self) -> JSONResponse:
        headers = {"Retry-After": "1"} if self.status in (429, 503) else None
        return JSONResponse({"error": {"message": self.message, "type": self.type, "param": self.param,
                                       "code": self.code}}, status_code=self.status, headers=headers)


class TextPart(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    type: Literal["text"]
    text: str


class Message(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    role: Literal["system", "developer", "user", "assistant"]
    content: Union[str, list[TextPart]]


class StreamOptions(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    include_usage: bool = False


class CommonRequest(BaseModel):
    """The fields both endpoints take. Strict: "5" is not an int, 1.0 is not a max_tokens."""

    model_config = ConfigDict(strict=True, extra="allow", allow_inf_nan=False)
    model: str | None = None
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0)
    top_p: float = Field(default=1.0, gt=0, le=1)
    top_k: int | None = Field(default=None, ge=1)  # an extension (vLLM's name for it)
    seed: int | None = Field(default=None, ge=-(1 << 63), le=(1 << 64) - 1)  # what torch.Generator takes
    stop: Union[str, list[str], None] = None
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None


class ChatRequest(CommonRequest):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)  # the newer name for max_tokens


class CompletionRequest(CommonRequest):
    prompt: Union[str, list[int]]


# Fields the OpenAI API has and this server does not implement: refused unless left at their default.
UNSUPPORTED = ("echo", "suffix", "best_of", "logprobs", "top_logprobs", "logit_bias", "presence_penalty",
               "frequency_penalty", "tools", "functions", "response_format")


def parse(model: type[BaseModel], body: Any) -> Any:
    if not isinstance(body, dict):
        raise ApiError(400, f"the request body must be a JSON object, got {type(body).__name__}")
    try:
        req = model.model_validate(body)
    except ValidationError as err:
        first = err.errors()[0]
        param = ".".join(str(p) for p in first["loc"]) or None
        raise ApiError(400, f"{param}: {first['msg']} (got {json.dumps(first.get('input'))[:100]})"
                       if param else first["msg"], param=param) from None
    for name in UNSUPPORTED:
        value = (req.model_extra or {}).get(name)
        if value not in (None, False, 0, "", [], {}) and not (name == "best_of" and value == 1):
            raise ApiError(400, f"{name} is not supported by this server", param=name)
    if req.n != 1:
        raise ApiError(400, f"n: only n=1 is supported, got {req.n}", param="n")
    return req


async def read_json(request: Request, limit: int) -> Any:
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > limit:
        raise ApiError(413, f"the request body is {int(length)} bytes, over this server's limit of {limit}",
                       code="request_too_large")
    body = bytearray()
    async for piece in request.stream():
        body += piece
        if len(body) > limit:
            raise ApiError(413, f"the request body is over this server's limit of {limit} bytes",
                           code="request_too_large")
    try:
        return json.loads(body)
    except (ValueError, UnicodeDecodeError) as err:
        raise ApiError(400, f"the request body is not valid JSON ({err})") from None


class Api:
    """The request handlers: validation, tokenization, and the scheduler's events as OpenAI responses."""

    def __init__(self, scheduler: Scheduler, model_name: str, max_body: int = MAX_BODY_BYTES):
        self.scheduler = scheduler
        self.runtime = scheduler.runtime
        self.model_name = model_name
        self.max_body = max_body
        self.created = int(time.time())

    def check_model(self, name: str | None) -> None:
        if name is not None and name != self.model_name:
            raise ApiError(404, f"the model {name!r} does not exist; this server serves {self.model_name!r}",
                           param="model", code="model_not_found")

    def sampling(self, req: CommonRequest, prompt_len: int, max_tokens: int | None, param: str) -> Sampling:
        S = self.runtime.max_seq_len
        if prompt_len >= S:
            raise ApiError(400, f"this model's context is {S} tokens (the artifact's max_seq_len); the prompt "
                           f"alone is {prompt_len} tokens", param=param, code="context_length_exceeded")
        if max_tokens is None:
            max_tokens = min(COMPLETION_MAX_TOKENS, S - prompt_len) if isinstance(req, CompletionRequest) \
                else S - prompt_len
        if prompt_len + max_tokens > S:
            raise ApiError(400, f"this model's context is {S} tokens (the artifact's max_seq_len); the request "
                           f"has {prompt_len} prompt tokens + {max_tokens} max_tokens = {prompt_len + max_tokens}",
                           param="max_tokens", code="context_length_exceeded")
        stop = (req.stop,) if isinstance(req.stop, str) else tuple(req.stop or ())
        if len(stop) > MAX_STOP_STRINGS or any(not s for s in stop):
            raise ApiError(400, f"stop: expected up to {MAX_STOP_STRINGS} non-empty strings", param="stop")
        return Sampling(max_tokens=max_tokens, temperature=req.temperature, top_p=req.top_p, top_k=req.top_k,
                        seed=req.seed, stop=stop)

    async def chat(self, request: Request) -> Response:
        req: ChatRequest = parse(ChatRequest, await read_json(request, self.max_body))
        self.check_model(req.model)
        messages = [{"role": "system" if m.role == "developer" else m.role,
                     "content": m.content if isinstance(m.content, str) else "".join(p.text for p in m.content)}
                    for m in req.messages]
        try:
            prompt = self.runtime.tokenizer.encode_chat(messages)
        except DbrxAotError as err:  # the chat template refused the conversation
            raise ApiError(400, str(err), param="messages") from None
        max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        return await self.generate(request, req, prompt, self.sampling(req, len(prompt), max_tokens, "messages"),
                                   chat=True)

    async def completions(self, request: Request) -> Response:
        req: CompletionRequest = parse(CompletionRequest, await read_json(request, self.max_body))
        self.check_model(req.model)
        if isinstance(req.prompt, str):
            prompt = self.runtime.tokenizer.encode(req.prompt)
        else:
            V = self.runtime.config.vocab_size
            if not all(0 <= t < V for t in req.prompt):
                raise ApiError(400, f"prompt: token ids must be in [0, {V})", param="prompt")
            prompt = list(req.prompt)
        if not prompt:
            raise ApiError(400, "prompt: empty, expected at least one token", param="prompt")
        return await self.generate(request, req, prompt, self.sampling(req, len(prompt), req.max_tokens, "prompt"),
                                   chat=False)

    async def generate(self, request: Request, req: CommonRequest, prompt: list[int], sampling: Sampling,
                       chat: bool) -> Response:
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[Event | None] = asyncio.Queue()  # None: the client went away
        job = Job(prompt, sampling, lambda event: loop.call_soon_threadsafe(events.put_nowait, event))
        try:
            self.scheduler.submit(job)
        except QueueFull:
            raise ApiError(429, f"the server is busy: all {self.runtime.batch_size} rows and "
                           f"{self.scheduler.max_queue} queue places are taken; retry later",
                           code="rate_limit_exceeded", type="rate_limit_error") from None
        except ShuttingDown:
            raise ApiError(503, "the server is shutting down", type="server_error") from None
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        if req.stream:
            include_usage = req.stream_options is not None and req.stream_options.include_usage
            return StreamingResponse(self.stream(job, events, rid, chat, include_usage),
                                     media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        return await self.collect(request, job, events, rid, chat)

    async def collect(self, request: Request, job: Job, events: asyncio.Queue, rid: str, chat: bool) -> Response:
        async def watch_disconnect() -> None:
            # The body is read, so the next message is the disconnect (or the end of our response).
            while (await request.receive())["type"] != "http.disconnect":
                pass
            job.cancel()
            events.put_nowait(None)

        watcher = asyncio.create_task(watch_disconnect())
        text = []
        try:
            while True:
                event = await events.get()
                if event is None:
                    return Response(status_code=499)  # the client went away; nobody reads this
                if isinstance(event, Token):
                    text.append(event.text)
                elif isinstance(event, Failed):
                    raise ApiError(event.status, event.message, type="server_error")
                else:
                    break
        finally:
            watcher.cancel()
            job.cancel()  # a no-op once finished; frees the row if this handler was cancelled
        content = "".join(text)
        choice = ({"index": 0, "message": {"role": "assistant", "content": content}} if chat
                  else {"index": 0, "text": content})
        return JSONResponse({
            "id": rid, "object": "chat.completion" if chat else "text_completion", "created": int(time.time()),
            "model": self.model_name,
            "choices": [{**choice, "logprobs": None, "finish_reason": event.reason}],
            "usage": usage(event),
        })

    async def stream(self, job: Job, events: asyncio.Queue, rid: str, chat: bool, include_usage: bool):
        created = int(time.time())
        head = {"id": rid, "object": "chat.completion.chunk" if chat else "text_completion", "created": created,
                "model": self.model_name}

        def chunk(text: str | None, finish: str | None, role: bool = False) -> str:
            if chat:
                delta = {} if text is None else {"content": text}
                choice = {"index": 0, "delta": {"role": "assistant", **delta} if role else delta}
            else:
                choice = {"index": 0, "text": text or ""}
            body = {**head, "choices": [{**choice, "logprobs": None, "finish_reason": finish}]}
            if include_usage:
                body["usage"] = None
            return f"data: {json.dumps(body)}\n\n"

        try:
            if chat:
                yield chunk("", None, role=True)
            while True:
                event = await events.get()
                if isinstance(event, Token):
                    if event.text:
                        yield chunk(event.text, None)
                elif isinstance(event, Failed):
                    error = {"message": event.message, "type": "server_error", "param": None, "code": None}
                    yield f"data: {json.dumps({'error': error})}\n\n"
                    break
                else:
                    yield chunk(None, event.reason)
                    if include_usage:
                        yield f"data: {json.dumps({**head, 'choices': [], 'usage': usage(event)})}\n\n"
                    break
            yield "data: [DONE]\n\n"
        finally:
            job.cancel()  # the client went away (the response task is cancelled): free the row


def usage(event: Finished) -> dict:
    return {"prompt_tokens": event.prompt_tokens, "completion_tokens": event.completion_tokens,
            "total_tokens": event.prompt_tokens + event.completion_tokens}


ENDPOINTS = ("/v1/chat/completions", "/v1/completions", "/v1/models", "/health", "/metrics")


class CountRequests:
    """ASGI middleware counting responses by endpoint and status (pure ASGI: streams pass through untouched)."""

    def __init__(self, app, metrics: Metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        endpoint = scope["path"] if scope["path"] in ENDPOINTS else "other"

        async def counting_send(message) -> None:
            if message["type"] == "http.response.start":
                self.metrics.requests.labels(endpoint, str(message["status"])).inc()
            await send(message)

        await self.app(scope, receive, counting_send)


def create_app(scheduler: Scheduler, model_name: str, max_body: int = MAX_BODY_BYTES) -> FastAPI:
    """The FastAPI application; its lifespan starts and stops the scheduler's thread."""
    api = Api(scheduler, model_name, max_body)
    metrics = scheduler.metrics

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        scheduler.start()
        try:
            yield
        finally:
            scheduler.stop()

    app = FastAPI(title="dbrx-aot", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)

    app.add_middleware(CountRequests, metrics=metrics)

    @app.exception_handler(ApiError)
    async def api_error(request: Request, err: ApiError) -> JSONResponse:
        return err.response()

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, err: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(err.status_code)
        return ApiError(err.status_code, f"{request.method} {request.url.path}: {err.detail}", code=code).response()

    @app.exception_handler(Exception)
    async def internal_error(request: Request, err: Exception) -> JSONResponse:
        log.exception("unhandled error")
        return ApiError(500, f"internal error: {type(err).__name__}", type="server_error").response()

    app.add_api_route("/v1/chat/completions", api.chat, methods=["POST"])
    app.add_api_route("/v1/completions", api.completions, methods=["POST"])

    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": api.created,
                                            "owned_by": "dbrx-aot"}]}

    @app.get("/health")
    async def health() -> dict:
        rt = scheduler.runtime
        return {"status": "ok", "runtime": rt.name, "device": str(rt.device), "rows": rt.batch_size,
                "max_seq_len": rt.max_seq_len}

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return app


def bind(host: str, port: int) -> socket.socket:
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        sock = socket.socket(family, kind, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
    except OSError as err:
        raise DbrxAotError(f"--host {host} --port {port}: cannot listen there ({err.strerror or err})") from None
    return sock


def serve(path: str | Path, *, runtime: str = "eager", device: str = "cpu", host: str = "127.0.0.1",
          port: int = 8000, max_queue: int = 64, grace: float = 30.0, model_name: str | None = None,
          verify_checksums: bool = True, progress: bool = True, ready: Callable[[str], None] = print) -> None:
    """Load the runtime and serve the OpenAI API until SIGTERM or Ctrl-C, then drain: stop accepting,
    let in-flight requests finish for up to ``grace`` seconds, cancel the rest, return."""
    import uvicorn

    if max_queue < 0:
        raise DbrxAotError(f"--max-queue {max_queue}: expected >= 0")
    if not grace >= 0:
        raise DbrxAotError(f"--grace {grace}: expected >= 0 seconds")
    sock = bind(host, port)  # before loading: a taken port fails fast
    try:
        rt = load_runtime(path, runtime=runtime, device=device, progress=progress,
                          **checksum_option(verify_checksums))
        name = model_name or Path(path).resolve().name
        app = create_app(Scheduler(rt, max_queue), name)
        server = uvicorn.Server(uvicorn.Config(app, timeout_graceful_shutdown=grace, log_level="info",
                                               lifespan="on"))
        sock.listen(2048)
        shown = f"[{sock.getsockname()[0]}]" if sock.family == socket.AF_INET6 else sock.getsockname()[0]
        ready(f"serving {name!r} ({rt.name} on {rt.device}, {rt.batch_size} rows x {rt.max_seq_len} tokens) "
              f"at http://{shown}:{sock.getsockname()[1]}/v1")
        # uvicorn re-raises the signal that stopped it once it has drained (SIGTERM's default action would
        # then kill the process, SIGINT's raise KeyboardInterrupt): a drained server has done its job, so
        # the re-raised signal is made a no-op and serve returns (exit 0).
        previous = {sig: signal.signal(sig, lambda *_: None) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            server.run(sockets=[sock])
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
    finally:
        sock.close()
