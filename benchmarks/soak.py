"""Long runs stay flat: resident memory at the start and end of a long training run and of a long
stretch of serving.

    python benchmarks/soak.py --train-time 10m --requests 10000 --out soak-runs   # about 15 minutes

Training: `lmforge train` (the default model on the Austen split) for --train-time; its RSS is read
from /proc every second; "start" is the median over 10-15% of the process's life (model, data and
optimizer allocated, allocator warmed up), "end" over 85-90% (still training). Serving: `lmforge serve` on that run
answers --requests short streaming requests from 8 clients; "start" is the RSS after the first 200.
Prints JSON with both, in MiB, and the growth.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path


def rss_mib(pid: int) -> float | None:
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    match = re.search(r"VmRSS:\s+(\d+) kB", text)
    return int(match.group(1)) / 1024 if match else None


def sample_rss(pid: int, samples: list, stop: threading.Event) -> None:
    start = time.time()
    while not stop.is_set():
        value = rss_mib(pid)
        if value is not None:
            samples.append((time.time() - start, value))
        time.sleep(1.0)


def soak_training(out: Path, seconds: float) -> dict:
    run = out / "train"
    child = subprocess.Popen([sys.executable, "-m", "lmforge", "train", "--out", str(run), "--max-time", str(seconds),
                              "--no-progress", "train.sample_tokens=0"], stdout=subprocess.PIPE, text=True)
    samples, stop = [], threading.Event()
    watcher = threading.Thread(target=sample_rss, args=(child.pid, samples, stop), daemon=True)
    watcher.start()
    output = child.communicate()[0]
    stop.set()
    watcher.join()
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    steps = max(r["step"] for r in rows)
    total = samples[-1][0]

    def median_between(a: float, b: float) -> float:  # within the training part of the process's life
        values = sorted(v for t, v in samples if a * total <= t <= b * total)
        return values[len(values) // 2]

    start, end = median_between(0.10, 0.15), median_between(0.85, 0.90)
    return {"train_time_s": seconds, "steps": steps, "rss_start_mb": start, "rss_end_mb": end,
            "rss_growth_mb": end - start, "rss_peak_mb": max(v for _, v in samples), "log": output.splitlines()[-3:]}


def soak_serving(run: Path, requests: int, clients: int = 8) -> dict:
    import httpx

    from lmforge.serving.load import _free_port, _wait_until_up

    port = _free_port()
    server = subprocess.Popen([sys.executable, "-m", "lmforge", "serve", str(run), "--port", str(port), "--name", "soak"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    url = f"http://127.0.0.1:{port}"
    done, failed, marks = 0, 0, {}

    async def client(http, n: int) -> None:
        nonlocal done, failed
        for i in range(n):
            body = {"model": "soak", "prompt": ["Emma", "Anne Elliot", "It was"][i % 3], "max_tokens": 8,
                    "stream": i % 2 == 0, "seed": i}
            try:
                response = await http.post(url + "/v1/completions", json=body)
                failed += response.status_code != 200
            except httpx.HTTPError:
                failed += 1
            done += 1
            if done == 200:
                marks["start"] = rss_mib(server.pid)

    async def drive() -> None:
        async with httpx.AsyncClient(timeout=120) as http:
            # the first requests % clients clients take one more, so that exactly --requests are sent
            await asyncio.gather(*(client(http, requests // clients + (c < requests % clients))
                                   for c in range(clients)))

    try:
        _wait_until_up(url, server)
        tic = time.time()
        asyncio.run(drive())
        seconds = time.time() - tic
        end = rss_mib(server.pid)
    finally:
        server.terminate()
        server.wait(timeout=30)
    return {"requests": done, "failed": failed, "seconds": seconds, "rss_after_200_mb": marks.get("start"),
            "rss_end_mb": end, "rss_growth_mb": None if marks.get("start") is None else end - marks["start"]}


def main() -> None:
    from lmforge.config import parse_duration

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="soak-runs", help="a folder for the run (emptied first)")
    p.add_argument("--train-time", default="10m")
    p.add_argument("--requests", type=int, default=10_000)
    args = p.parse_args()
    train_time = parse_duration(args.train_time)  # bad input fails before --out is emptied
    if args.requests < 1:
        p.error("--requests must be at least 1")
    out = Path(args.out)
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    training = soak_training(out, train_time)
    serving = soak_serving(out / "train", args.requests)
    print(json.dumps({"benchmark": "soak", "training": training, "serving": serving}, indent=2))


if __name__ == "__main__":
    from lmforge.errors import LmforgeError

    try:
        main()
    except LmforgeError as e:  # bad input: one line, as lmforge's own commands say it
        sys.exit(f"error: {e}")
