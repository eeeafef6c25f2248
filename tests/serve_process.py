"""`dbrx-aot serve` as a subprocess, and what a served answer is compared with: shared by the
server's tests (tests/test_server.py) and the GPU tests (tests/test_gpu.py)."""

from __future__ import annotations

import http.client
import json
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from dbrx_aot.generate import generate


def reference(rt, prompt: list[int], max_tokens: int) -> list[int]:
    """The ids generate() gives this prompt alone, greedy (an eos that ends it is its last id)."""
    return generate(rt, [prompt], max_new_tokens=max_tokens, temperature=0.0)[0]


def reference_text(rt, prompt: list[int], max_tokens: int) -> str:
    return rt.tokenizer.decode([t for t in reference(rt, prompt, max_tokens) if t not in rt.tokenizer.eos_ids])



class Server:
    """`dbrx-aot serve` on 127.0.0.1, a port it picks; the URL from its ready line on stdout.
    ``start_s`` bounds a stuck start (a server loads in seconds, more on a loaded machine)."""

    def __init__(self, artifact: Path, log: Path, *args: str, start_s: float = 180):
        self.log = log
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "dbrx_aot.cli", "--quiet", "serve", str(artifact), "--runtime", "aoti",
             "--host", "127.0.0.1", "--port", "0", *args],
            stdout=subprocess.PIPE, stderr=open(log, "w"), text=True)
        lines: queue.Queue = queue.Queue()
        threading.Thread(target=lambda: lines.put(self.proc.stdout.readline()), daemon=True).start()
        try:
            line = lines.get(timeout=start_s)
        except queue.Empty:
            self.kill()
            pytest.fail(f"no ready line in {start_s} s: {log.read_text()[-2000:]}")
        match = re.search(r"http://127\.0\.0\.1:(\d+)/v1", line)
        if match is None:
            self.kill()
            pytest.fail(f"ready line {line!r}; log: {log.read_text()[-2000:]}")
        self.port = int(match.group(1))
        self.url = f"http://127.0.0.1:{self.port}/v1"
        deadline = time.monotonic() + 30
        while True:
            try:
                if request(self.port, "GET", "/health")[0] == 200:
                    break
            except OSError:
                pass
            if time.monotonic() > deadline:
                self.kill()
                pytest.fail(f"/health never answered 200: {log.read_text()[-2000:]}")
            time.sleep(0.2)

    def client(self):
        """The official OpenAI client on this server (the test extra; the GPU image lacks it)."""
        import openai

        return openai.OpenAI(base_url=self.url, api_key="unused", max_retries=0, timeout=120)

    def terminate(self, timeout: float = 60) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            pytest.fail(f"the server did not exit {timeout} s after SIGTERM")

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait(10)

    def metric(self, name: str) -> float:
        body = request(self.port, "GET", "/metrics")[1].decode()
        values = [float(line.split()[-1]) for line in body.splitlines() if line.startswith(name + " ")
                  or line.startswith(name + "{")]
        return sum(values)


def request(port: int, method: str, path: str, body: bytes | str | None = None,
            headers: dict | None = None) -> tuple[int, bytes, http.client.HTTPResponse]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        conn.request(method, path, body=body, headers={"Content-Type": "application/json", **(headers or {})})
        resp = conn.getresponse()
        return resp.status, resp.read(), resp
    finally:
        conn.close()


def open_stream(port: int, path: str, body: dict) -> tuple[http.client.HTTPConnection, http.client.HTTPResponse]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    conn.request("POST", path, body=json.dumps({**body, "stream": True}),
                 headers={"Content-Type": "application/json"})
    return conn, conn.getresponse()


def next_event(resp: http.client.HTTPResponse):
    """The next SSE data payload: a dict, "[DONE]", or None at the end of the stream."""
    while True:
        line = resp.readline()
        if not line:
            return None
        line = line.decode().strip()
        if line.startswith("data: "):
            data = line[len("data: "):]
            return data if data == "[DONE]" else json.loads(data)
