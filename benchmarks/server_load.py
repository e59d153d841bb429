"""Load on the HTTP server: requests/s and p50/p95 latency with 1 and 8 concurrent clients, on loopback.

Starts `mcllava serve BANK` in a subprocess, warms it up, then for each client count sends a bounded number
of identical chat requests (a photo and a question) and records each latency. It also checks that every
answer equals the single-client answer and reports the server's resident memory after each run.

    python benchmarks/server_load.py --bank BANK [--requests 40] [--clients 1 8] [--max-tokens 16]
    python benchmarks/server_load.py --tiny          # an untrained tiny bank, as the tests build

Writes benchmarks/out/server_load.json.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
from PIL import Image, ImageDraw
from server_soak import drive  # the shared client-threads driver (benchmarks/ is on sys.path when run as a script)

from mcllava.smollm2 import smollm2_tokenizer
from mcllava.testing import make_bank, make_base

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "benchmarks" / "out" / "server_load.json"


def photo_url(size: int = 256) -> str:
    im = Image.new("RGB", (size, size), (120, 120, 120))
    ImageDraw.Draw(im).rectangle((size // 4, size // 4, 3 * size // 4, 3 * size // 4), fill=(220, 40, 40))
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def tiny_bank(root: Path) -> Path:
    """An untrained tiny base and a random bank (the tests' helpers): for the plumbing, not for quality."""
    smollm2_tokenizer(root / "tokenizer")
    return make_bank(make_base(root / "tokenizer", root / "base"), root / "bank")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_mb(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def run(url: str, payload: dict, clients: int, requests: int) -> dict:
    """Send `requests` chat requests from `clients` threads; latencies, throughput, errors and answers."""
    latencies: list[float] = []
    answers: list[str] = []
    errors: list[str] = []

    def record(n: int, name: str, r: httpx.Response, took: float) -> None:
        latencies.append(took)
        if r.status_code == 200:
            answers.append(r.json()["choices"][0]["message"]["content"])
        else:
            errors.append(f"{r.status_code}: {r.text[:200]}")

    cycle = [("chat", "/v1/chat/completions", {"json": payload})]
    wall = drive(url, cycle, requests, clients, headers=None, on_request=record, timeout=600)
    ordered = sorted(latencies)
    return {
        "clients": clients,
        "requests": requests,
        "errors": len(errors),
        "error_samples": errors[:3],
        "seconds": round(wall, 3),
        "requests_per_s": round(requests / wall, 3),
        "p50_ms": round(1000 * statistics.median(ordered), 1),
        "p95_ms": round(1000 * ordered[min(len(ordered) - 1, int(0.95 * len(ordered)))], 1),
        "answers": sorted(set(answers)),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bank", type=Path, help="concept bank folder to serve")
    ap.add_argument("--tiny", action="store_true", help="build and serve an untrained tiny bank")
    ap.add_argument("--base", help="override the base model the bank remembers")
    ap.add_argument("--requests", type=int, default=40, help="requests per client count")
    ap.add_argument("--clients", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--question", default="Is <{c}> in this photo?")
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args()
    if (args.bank is None) == (not args.tiny):
        ap.error("give --bank BANK or --tiny")

    with tempfile.TemporaryDirectory(prefix="mcllava-load-") as tmp:
        bank = tiny_bank(Path(tmp)) if args.tiny else args.bank
        base = args.base or (
            str(Path(tmp) / "base") if args.tiny else None
        )  # a local base is not followed from the bank
        first = json.loads((Path(bank) / "manifest.json").read_text())["concept_ids"][0]
        port = free_port()
        cmd = [sys.executable, "-m", "mcllava.cli", "serve", str(bank), "--port", str(port)] + (
            ["--base", base] if base else []
        )
        server = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        url = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + 600
            while True:
                if server.poll() is not None:
                    raise SystemExit(f"the server exited: {server.stderr.read()[-2000:]}")
                try:
                    if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                if time.monotonic() > deadline:
                    raise SystemExit("the server did not start in 10 minutes")
                time.sleep(0.5)
            question = args.question.format(c=first)
            payload = {
                "messages": [
                    {
                        "role": "user",
                        "content": [
                            {"type": "text", "text": question},
                            {"type": "image_url", "image_url": {"url": photo_url()}},
                        ],
                    }
                ],
                "max_tokens": args.max_tokens,
            }
            run(url, payload, 2, 4)  # warm-up
            warm = rss_mb(server.pid)
            runs = []
            for clients in args.clients:
                result = run(url, payload, clients, args.requests)
                result["server_rss_mb"] = rss_mb(server.pid)
                runs.append(result)
                print(
                    f"{clients} client(s): {result['requests_per_s']} req/s, p50 {result['p50_ms']} ms, p95 {result['p95_ms']} ms, {result['errors']} errors",
                    flush=True,
                )
        finally:
            server.terminate()
            server.wait(30)
    answers = {a for r in runs for a in r["answers"]}
    report = {
        "bank": "tiny (untrained)" if args.tiny else str(args.bank),
        "question": question,
        "max_tokens": args.max_tokens,
        "image": "256x256 PNG",
        "machine": {
            "python": platform.python_version(),
            "cpus": __import__("os").cpu_count(),
            "platform": platform.platform(),
        },
        "server_rss_mb_after_warmup": warm,
        "identical_answers": len(answers) == 1,
        "runs": runs,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
