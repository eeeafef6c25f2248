"""Load a running `dbrx-aot serve` at a few concurrencies; print throughput and latency per level.

For each concurrency C, C client threads each send --requests streaming completions one after
another (greedy, a prompt of exactly --prompt-len token ids, --max-tokens new tokens), so C
requests are in flight at once. Per level it prints: total tok/s (every generated token / the
level's wall time), and over the requests, p50/p99 time to first token (request sent -> first
text chunk) and inter-token latency ((finish chunk - first text chunk) / (tokens - 1)).
Only the standard library; only the address given (127.0.0.1 by default); bounded by the counts
given and a per-request timeout.

    python scripts/load_server.py --port 8000 --concurrency 1 2 4 8 --requests 4 --prompt-len 32 --max-tokens 64
"""

from __future__ import annotations

import argparse
import http.client
import json
import threading
import time


def one_request(host: str, port: int, prompt: list[int], max_tokens: int, timeout: float) -> dict:
    conn = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True,
                "stream_options": {"include_usage": True}}
        start = time.perf_counter()
        conn.request("POST", "/v1/completions", body=json.dumps(body), headers={"Content-Type": "application/json"})
        resp = conn.getresponse()
        if resp.status != 200:
            raise RuntimeError(f"HTTP {resp.status}: {resp.read()[:200]!r}")
        first = end = None
        tokens = 0
        for line in resp:
            if not line.startswith(b"data: "):
                continue
            data = line[6:].strip()
            if data == b"[DONE]":
                break
            chunk = json.loads(data)
            now = time.perf_counter()
            if "error" in chunk:
                raise RuntimeError(chunk["error"]["message"])
            if chunk["choices"]:
                choice = chunk["choices"][0]
                if choice["text"] and first is None:
                    first = now
                if choice["finish_reason"] is not None:
                    end = now
            elif chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
        first = first if first is not None else end
        return {"ttft": first - start, "itl": (end - first) / (tokens - 1) if tokens > 1 else None,
                "tokens": tokens}
    finally:
        conn.close()


def percentile(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, round(q / 100 * (len(values) - 1)))]


def level(host: str, port: int, concurrency: int, requests: int, prompt_len: int, max_tokens: int,
          timeout: float) -> dict:
    results: list[dict] = []
    errors: list[str] = []
    lock = threading.Lock()

    def client(n: int) -> None:
        for r in range(requests):
            # Distinct prompts per request (ids well inside the tokenizer's range).
            prompt = [1000 + (n * 997 + r * 131 + i * 17) % 90000 for i in range(prompt_len)]
            try:
                out = one_request(host, port, prompt, max_tokens, timeout)
            except (OSError, RuntimeError) as err:
                with lock:
                    errors.append(str(err))
                return
            with lock:
                results.append(out)

    threads = [threading.Thread(target=client, args=(n,)) for n in range(concurrency)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    if errors:
        raise SystemExit(f"concurrency {concurrency}: {len(errors)} request(s) failed, first: {errors[0]}")
    ttft = [r["ttft"] for r in results]
    itl = [r["itl"] for r in results if r["itl"] is not None]
    tokens = sum(r["tokens"] for r in results)
    return {"concurrency": concurrency, "requests": len(results), "tokens": tokens, "seconds": wall,
            "tok_s": tokens / wall, "ttft_p50_ms": 1e3 * percentile(ttft, 50), "ttft_p99_ms": 1e3 * percentile(ttft, 99),
            "itl_p50_ms": 1e3 * percentile(itl, 50), "itl_p99_ms": 1e3 * percentile(itl, 99)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--requests", type=int, default=4, help="requests per client thread")
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--timeout", type=float, default=600, help="seconds per request")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        raise SystemExit("--host: this load script only talks to the loopback address")
    one_request(args.host, args.port, [1000] * args.prompt_len, 2, args.timeout)  # warm up
    rows = [level(args.host, args.port, c, args.requests, args.prompt_len, args.max_tokens, args.timeout)
            for c in args.concurrency]
    if args.json:
        print(json.dumps(rows, indent=2))
        return
    print("| concurrency | requests | tokens | total tok/s | TTFT p50 ms | TTFT p99 ms | ITL p50 ms | ITL p99 ms |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['concurrency']} | {r['requests']} | {r['tokens']} | {r['tok_s']:.1f} | {r['ttft_p50_ms']:.0f} | "
              f"{r['ttft_p99_ms']:.0f} | {r['itl_p50_ms']:.1f} | {r['itl_p99_ms']:.1f} |")


if __name__ == "__main__":
    main()
