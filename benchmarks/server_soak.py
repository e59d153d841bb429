"""Soak the HTTP server on loopback: 8 concurrent clients, a bounded number of mixed requests, flat memory.

uvicorn runs the app in a thread of this process on 127.0.0.1 (a random port); the clients send a fixed cycle
of requests (chat with a photo, chat without, streamed chat, locate by JSON and by upload). Every answer must
equal the answer to the same request sent alone, no request may fail, and the resident memory of the process
(server and clients) is sampled after warm-up and after each quarter of the run.

    python benchmarks/server_soak.py                    # 400 requests, 8 clients, an untrained tiny bank
    python benchmarks/server_soak.py --requests 48      # what the CI test runs (tests/test_reliability_load.py)

Writes benchmarks/out/server_soak.json: requests/s, p50/p95 latency, errors, memory samples.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import threading
import time
from pathlib import Path

import httpx

from mcllava.server import create_app
from mcllava.smollm2 import smollm2_tokenizer
from mcllava.testing import data_url, make_bank, make_base, png_bytes, red_photo, serving

ROOT = Path(__file__).resolve().parents[1]

OUT = ROOT / "benchmarks" / "out" / "server_soak.json"


def rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def requests_cycle() -> list[tuple[str, str, dict]]:
    """(name, path, httpx keyword arguments) of the request kinds, sent in this order over and over."""
    photo = red_photo(96)

    def chat(text, image=True, **extra):
        content = [{"type": "text", "text": text}] + (
            [{"type": "image_url", "image_url": {"url": data_url(photo)}}] if image else []
        )
        return {"json": {"messages": [{"role": "user", "content": content}], "max_tokens": 4, **extra}}

    return [
        ("chat+photo", "/v1/chat/completions", chat("Is <bo> in this photo?")),
        ("chat", "/v1/chat/completions", chat("Who is <ana>?", image=False)),
        ("chat-stream", "/v1/chat/completions", chat("What is <bo> doing?", stream=True)),
        ("locate-json", "/v1/locate", {"json": {"image": data_url(photo)}}),
        ("locate-upload", "/v1/locate", {"files": {"image": ("p.png", png_bytes(photo), "image/png")}}),
    ]


def answer_of(r: httpx.Response) -> str:
    """What must not change between runs: the answer text (streamed or not) or the locations."""
    if r.headers.get("content-type", "").startswith("text/event-stream"):
        events = [json.loads(line[6:]) for line in r.text.splitlines() if line.startswith("data: {")]
        return "".join(e["choices"][0]["delta"].get("content") or "" for e in events if e.get("choices"))
    body = r.json()
    return (
        body["choices"][0]["message"]["content"] if "choices" in body else json.dumps(body["locations"], sort_keys=True)
    )


def drive(
    url: str, cycle: list, requests: int, clients: int, headers: dict | None, on_request=None, timeout: float = 300
) -> float:
    """Send `requests` requests of `cycle` (in turn) from `clients` threads; call on_request(n, name, response, seconds).

    Returns the wall time. `on_request` runs under a lock, so it may append to shared lists."""
    counter = iter(range(requests))
    lock = threading.Lock()

    def client() -> None:
        with httpx.Client(base_url=url, timeout=timeout, headers=headers) as http:
            while True:
                with lock:
                    n = next(counter, None)
                if n is None:
                    return
                name, path, kw = cycle[n % len(cycle)]
                start = time.perf_counter()
                r = http.request("POST", path, **kw)
                took = time.perf_counter() - start
                if on_request is not None:
                    with lock:
                        on_request(n, name, r, took)

    threads = [threading.Thread(target=client) for _ in range(clients)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return time.perf_counter() - start


def soak(url: str, requests: int, clients: int = 8, headers: dict | None = None) -> dict:
    """Single-client answers first, a concurrent warm-up, then `requests` requests from `clients` threads."""
    cycle = requests_cycle()
    with httpx.Client(base_url=url, timeout=300, headers=headers) as http:
        expected = {name: answer_of(http.request("POST", path, **kw)) for name, path, kw in cycle}
    drive(url, cycle, 2 * clients * len(cycle), clients, headers)  # warm-up: thread pools, allocator, caches
    memory = [round(rss_mb(), 1)]
    latencies: list[float] = []
    errors: list[str] = []
    mismatches: list[str] = []
    checkpoints = {requests * q // 4 for q in (1, 2, 3)}

    def record(n: int, name: str, r: httpx.Response, took: float) -> None:
        latencies.append(took)
        if r.status_code != 200:
            errors.append(f"{name}: {r.status_code} {r.text[:200]}")
        elif answer_of(r) != expected[name]:
            mismatches.append(name)
        if n in checkpoints:
            memory.append(round(rss_mb(), 1))

    wall = drive(url, cycle, requests, clients, headers, record)
    memory.append(round(rss_mb(), 1))
    ordered = sorted(latencies)
    return {
        "requests": requests,
        "clients": clients,
        "kinds": [c[0] for c in cycle],
        "errors": len(errors),
        "error_samples": errors[:3],
        "mismatches": len(mismatches),
        "seconds": round(wall, 2),
        "requests_per_s": round(requests / wall, 2),
        "p50_ms": round(1000 * statistics.median(ordered), 1),
        "p95_ms": round(1000 * ordered[int(0.95 * (len(ordered) - 1))], 1),
        "rss_mb": memory,
        "rss_growth_mb": round(memory[-1] - memory[0], 1),
    }


def tiny_app(root: Path):
    """The app on an untrained tiny base with a random bank (`mcllava.testing`): for the plumbing, not for quality."""
    smollm2_tokenizer(root / "tokenizer")
    return create_app(
        str(make_bank(make_base(root / "tokenizer", root / "base"), root / "bank")), base=str(root / "base")
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=400)
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="mcllava-soak-") as tmp, serving(tiny_app(Path(tmp))) as url:
        report = soak(url, args.requests, args.clients)
    report["bank"] = "tiny (untrained), in-process uvicorn on 127.0.0.1"
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
