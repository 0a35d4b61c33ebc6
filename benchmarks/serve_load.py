"""Load on `gptforge serve`: 1, 4 and 16 concurrent streaming clients, continuous batching vs one request at
a time, measured in the same run.

Two servers run side by side as subprocesses on the same model (`--max-batch 16` and `--max-batch 1`: the same
server with batching off), and each load level is run against them in alternation, `--repeats` times (A/B
interleaved, medians reported). Each client sends `--requests` streamed /v1/completions requests one after
the other, each generating `--max-tokens` tokens (`ignore_eos`, vLLM's extension; `--natural-ends` lets the
model end them). Reported per server and level: aggregate generated tokens/s (usage-counted tokens / wall time),
time to first token p50/p95, time between tokens p50/p95, and the ratio of the two throughputs.

    python benchmarks/serve_load.py                       # runs/demo-chat if it exists, else dev-17m (random)
    python benchmarks/serve_load.py --model runs/chat --clients 1 4 16 --max-tokens 64
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import httpx

PROMPT = "The history of the city begins with a small settlement on the river, where"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model: str, max_batch: int, threads: int | None,
                 extra_args: list[str] | None = None, log: Path | None = None) -> tuple[subprocess.Popen, str]:
    """`gptforge serve` on a free port, once it answers /health; `extra_args`: more options (--dtype, ...)."""
    env = dict(os.environ)
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    return launch(lambda port: [sys.executable, "-m", "gptforge", "serve", "--model", model, "--port", str(port),
                                "--max-batch", str(max_batch), "--max-queued", "256", "--name", "bench",
                                *(extra_args or [])], env, log)


def launch(command: Callable[[int], list[str]], env: dict | None = None,
           log: Path | None = None) -> tuple[subprocess.Popen, str]:
    """Any HTTP server with a /health route (another program too, e.g. llama-server): `command(port)` is its
    command line for a free port; its output goes to `log` when given (else to this terminal)."""
    port = free_port()
    out = open(log, "wb") if log is not None else None
    try:
        proc = subprocess.Popen(command(port), env=env, stdout=out, stderr=subprocess.STDOUT if out else None,
                                stdin=subprocess.DEVNULL)
    finally:
        if out is not None:
            out.close()  # the child holds its own descriptor
    return proc, wait_ready(proc, f"http://127.0.0.1:{port}", log)


def wait_ready(proc: subprocess.Popen, url: str, log: Path | None = None) -> str:
    """`url` once the server `proc` answers /health (SystemExit if it exits or takes over 300 s)."""
    deadline = time.monotonic() + 300
    while True:
        if proc.poll() is not None:
            tail = f"; the end of its log {log}:\n{log.read_text(errors='replace')[-2000:]}" if log else ""
            raise SystemExit(f"the server {proc.args[:3]}... exited ({proc.returncode}){tail}")
        if time.monotonic() > deadline:
            proc.kill()
            raise SystemExit("the server did not become ready in 300 s")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return url
        except httpx.TransportError:
            pass
        time.sleep(0.2)


async def one_request(http: httpx.AsyncClient, url: str, max_tokens: int, seed: int, ignore_eos: bool,
                      extra: dict | None = None) -> tuple[float, list[float], int]:
    """(time to first token, gaps between tokens, tokens generated) of one streamed completion; `extra`:
    more body fields (response_format, ...)."""
    body = {"model": "bench", "prompt": PROMPT, "max_tokens": max_tokens, "temperature": 0.8, "seed": seed,
            "stream": True, "stream_options": {"include_usage": True}, "ignore_eos": ignore_eos, **(extra or {})}
    start = time.perf_counter()
    first, last, gaps, tokens = None, None, [], 0
    for attempt in range(2):
        try:
            async with http.stream("POST", url + "/v1/completions", json=body) as r:
                r.raise_for_status()
                async for line in r.aiter_lines():
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    chunk = json.loads(line[6:])
                    if chunk.get("usage"):
                        tokens = chunk["usage"]["completion_tokens"]
                    if chunk["choices"] and chunk["choices"][0]["text"]:
                        now = time.perf_counter()
                        if first is None:
                            first = now - start
                        else:
                            gaps.append(now - last)
                        last = now
            break
        except httpx.RemoteProtocolError:
            # The server closed a kept-alive connection just as this request went out on it (seen with
            # llama-server between one client's requests): nothing was answered, so send it once more on a
            # new connection, on the same clock. A stream cut after it began is an error.
            if attempt or first is not None:
                raise
    return (first if first is not None else time.perf_counter() - start), gaps, tokens


async def load(url: str, clients: int, requests: int, max_tokens: int, ignore_eos: bool = True,
               extra: dict | None = None) -> dict[str, float]:
    """`clients` concurrent clients, each streaming `requests` completions one after the other; `extra`: more
    body fields of every request."""
    ttfts, gaps, tokens = [], [], 0

    async def client(c: int) -> None:
        nonlocal tokens
        for i in range(requests):
            t, g, n = await one_request(http, url, max_tokens, 1000 * c + i, ignore_eos, extra)
            ttfts.append(t)
            gaps.extend(g)
            tokens += n

    async with httpx.AsyncClient(timeout=600, limits=httpx.Limits(max_connections=clients + 4)) as http:
        start = time.perf_counter()
        await asyncio.gather(*(client(c) for c in range(clients)))
        wall = time.perf_counter() - start
    return {"tok_s": tokens / wall, "ttft_p50": pct(ttfts, 50), "ttft_p95": pct(ttfts, 95),
            "tpot_p50": pct(gaps, 50), "tpot_p95": pct(gaps, 95), "tokens": tokens}


def pct(values: list[float], q: int) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, max(0, round(q / 100 * (len(values) - 1))))]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="default: runs/demo-chat if it exists, else the dev-17m preset")
    p.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16])
    p.add_argument("--requests", type=int, default=2, help="streamed requests per client, one after the other")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=1, help="A/B rounds per level (medians reported)")
    p.add_argument("--threads", type=int, default=None, help="OMP_NUM_THREADS of each server")
    p.add_argument("--natural-ends", action="store_true",
                   help="let replies end where the model ends them (default: every reply is max_tokens long, "
                        "through vLLM's ignore_eos extension, so both servers generate the same work)")
    args = p.parse_args()
    model = args.model or ("runs/demo-chat" if Path("runs/demo-chat").is_dir() else "dev-17m")

    servers = {}
    try:
        for label, rows in (("batched", 16), ("one-at-a-time", 1)):
            servers[label] = start_server(model, rows, args.threads)
        for proc, url in servers.values():  # warm-up: first-call costs out of the measurements
            asyncio.run(load(url, 2, 1, 8))
        print(f"model {model}; {args.requests} requests x {args.max_tokens} tokens per client"
              f"{' (or fewer: natural ends)' if args.natural_ends else ''}; "
              f"load average before: {' '.join(f'{x:.2f}' for x in os.getloadavg())}", flush=True)
        results: dict[tuple[str, int], list[dict[str, float]]] = {}
        for clients in args.clients:
            for r in range(args.repeats):
                order = list(servers) if r % 2 == 0 else list(reversed(servers))
                for label in order:
                    results.setdefault((label, clients), []).append(
                        asyncio.run(load(servers[label][1], clients, args.requests, args.max_tokens,
                                         not args.natural_ends)))
        header = (f"{'clients':>7} {'server':>14} {'tok/s':>8} {'TTFT p50':>9} {'TTFT p95':>9} "
                  f"{'tok gap p50':>11} {'tok gap p95':>11} {'x one-at-a-time':>15}")
        print(header)
        print("-" * len(header))
        for clients in args.clients:
            med = {label: {k: statistics.median(m[k] for m in results[(label, clients)])
                           for k in results[(label, clients)][0]} for label in servers}
            for label in servers:
                m = med[label]
                ratio = m["tok_s"] / med["one-at-a-time"]["tok_s"]
                print(f"{clients:>7} {label:>14} {m['tok_s']:>8.1f} {m['ttft_p50']:>8.3f}s {m['ttft_p95']:>8.3f}s "
                      f"{m['tpot_p50'] * 1000:>9.1f}ms {m['tpot_p95'] * 1000:>9.1f}ms {ratio:>14.2f}x")
        print(f"load average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    finally:
        for proc, _ in servers.values():
            proc.terminate()
        for proc, _ in servers.values():
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()


if __name__ == "__main__":
    main()
