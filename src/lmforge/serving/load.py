"""`lmforge bench serve RUN`: a load test of `lmforge serve` on loopback.

Starts the server in a child process, then for each client count runs that many concurrent streaming
clients for a fixed time (each sends a request, reads its stream to the end, sends the next), and
reports requests ok/failed, total new tokens/s, p50/p99 time to first token and per-request latency,
and the server's peak and final resident memory.
"""
from __future__ import annotations

import asyncio
import json
import socket
import subprocess
import sys
import time
from pathlib import Path

from ..errors import LmforgeError

PROMPTS = ["Emma Woodhouse", "Anne Elliot", "Mr. Knightley", "It was a", "She had never", "Captain Wentworth",
           "The evening", "Harriet"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _memory_kib(pid: int) -> dict:
    """The server's peak (VmHWM) and current (VmRSS) resident memory, from /proc (Linux)."""
    try:
        fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines())
        return {"peak_rss_mb": int(fields["VmHWM"].split()[0]) / 1024, "rss_mb": int(fields["VmRSS"].split()[0]) / 1024}
    except (OSError, KeyError, ValueError):
        return {}


async def _client(http, url: str, name: str, index: int, deadline: float, max_tokens: int, results: list) -> None:
    """Send streaming requests one after another until the deadline; record each one."""
    n = 0
    while time.perf_counter() < deadline:
        body = {"model": name, "prompt": PROMPTS[(index + n) % len(PROMPTS)], "max_tokens": max_tokens,
                "temperature": 0.8, "stream": True, "stream_options": {"include_usage": True},
                "ignore_eos": True}
        n += 1
        start, first, tokens, ok = time.perf_counter(), None, 0, False
        try:
            async with http.stream("POST", url + "/v1/completions", json=body) as response:
                if response.status_code != 200:
                    await response.aread()
                else:
                    async for line in response.aiter_lines():
                        if not line.startswith("data: "):
                            continue
                        data = line[6:]
                        if data == "[DONE]":
                            ok = True
                            break
                        chunk = json.loads(data)
                        if chunk.get("error"):
                            break
                        if first is None and chunk["choices"] and chunk["choices"][0].get("text"):
                            first = time.perf_counter() - start
                        if chunk.get("usage"):
                            tokens = chunk["usage"]["completion_tokens"]
        except Exception:  # a refused connection, a reset stream: a failed request
            ok = False
        results.append({"ok": ok, "ttft": first, "latency": time.perf_counter() - start, "tokens": tokens,
                        "end": time.perf_counter()})


def _percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    values = sorted(values)
    return values[min(len(values) - 1, round(q * (len(values) - 1)))]


async def _load(url: str, name: str, clients: int, seconds: float, max_tokens: int) -> dict:
    import httpx

    results: list = []
    limits = httpx.Limits(max_connections=clients + 4, max_keepalive_connections=clients + 4)
    async with httpx.AsyncClient(timeout=httpx.Timeout(300.0), limits=limits) as http:
        start = time.perf_counter()
        await asyncio.gather(*(_client(http, url, name, i, start + seconds, max_tokens, results)
                               for i in range(clients)))
        elapsed = time.perf_counter() - start
    good = [r for r in results if r["ok"]]
    ttft = [r["ttft"] for r in good if r["ttft"] is not None]
    latency = [r["latency"] for r in good]
    return {"clients": clients, "requests_ok": len(good), "requests_failed": len(results) - len(good),
            "new_tokens": sum(r["tokens"] for r in good), "elapsed_s": elapsed,
            "new_tokens_per_s": sum(r["tokens"] for r in good) / elapsed,
            "ttft_p50_ms": None if not ttft else 1000 * _percentile(ttft, 0.5),
            "ttft_p99_ms": None if not ttft else 1000 * _percentile(ttft, 0.99),
            "latency_p50_s": _percentile(latency, 0.5), "latency_p99_s": _percentile(latency, 0.99)}


def bench_serve(run: str, clients: tuple = (1, 8, 32), duration: float = 20.0, max_tokens: int = 64,
                threads: int | None = None) -> dict:
    """The load benchmark (see the module docstring); the server decodes up to 32 requests together."""
    if not (Path(run) / "config.json").exists():
        raise LmforgeError(f"{run} is not a run folder; train one first (lmforge train --out runs/austen)")
    port = _free_port()
    server = subprocess.Popen([sys.executable, "-m", "lmforge", "serve", str(run), "--port", str(port), "--name", "bench",
                               "--max-batch", "32", "--max-waiting", "64", *(["--threads", str(threads)] if threads else [])],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_until_up(url, server)
        start_memory = _memory_kib(server.pid)
        rounds = [asyncio.run(_load(url, "bench", n, duration, max_tokens)) for n in clients]
        memory = _memory_kib(server.pid)
    finally:
        server.terminate()
        server.wait(timeout=30)
    single = next((r["new_tokens_per_s"] for r in rounds if r["clients"] == 1), None)
    out = {"benchmark": "serve", "run": str(run), "duration_s": duration, "max_tokens": max_tokens,
           "rounds": rounds, "server_rss_start_mb": start_memory.get("rss_mb"),
           "server_rss_end_mb": memory.get("rss_mb"), "server_peak_rss_mb": memory.get("peak_rss_mb")}
    if single:
        out["speedup_vs_1_client"] = {str(r["clients"]): r["new_tokens_per_s"] / single for r in rounds}
    return out


def _wait_until_up(url: str, server: subprocess.Popen, timeout: float = 120.0) -> None:
    import httpx

    deadline = time.time() + timeout
    while time.time() < deadline:
        if server.poll() is not None:
            raise LmforgeError(f"the server exited: {server.stderr.read().decode(errors='replace').strip()[-300:]}")
        try:
            if httpx.get(url + "/health", timeout=1.0).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise LmforgeError(f"the server did not answer within {timeout:.0f} s")

