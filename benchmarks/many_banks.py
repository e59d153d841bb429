"""Many banks on one base: memory and answer latency of 100 resident banks against a server of one bank.

Generates `--banks` banks from one trained bank (`--bank`): bank i is a copy with its concepts renamed (`ana` ->
`ana007`) and its rows moved by a little seeded noise (1% of their scale), so that no two banks share a token
or a row. Then:
- memory: a fresh process loads a one-bank server (`create_app(PersonalAssistant)`, as `mcllava serve BANK`),
  another the server of all banks (`create_app(SharedBase)`, as `mcllava serve FOLDER`); each answers `--warm`
  questions and reports its resident memory (RSS). Memory above one bank, per extra bank, against the bank's files;
- latency: one process holds both servers and alternates requests (same photo, same question, greedy answers of
  `--max-tokens` tokens): the one-bank server on bank 0; the many-bank server on bank 0 (the same bank again and
  again: its rows stay, its prompt cache is warm); the many-bank server round the banks (each answer for the
  next bank: rows written, and no prompt cache survives with more banks than `--prompt-caches`); and, for
  comparison with the last, the one-bank server with its prompt cache off. Answers of bank 0 must be equal on
  both servers.

    python benchmarks/many_banks.py --bank BANK [--banks 100] [--answers 20] [--max-tokens 16]
    python benchmarks/many_banks.py --tiny     # an untrained tiny bank, as the tests build (plumbing only)

Writes benchmarks/out/many_banks.json and .png.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch
from _common import OUT, rss_mb, write_results
from fastapi.testclient import TestClient
from server_load import photo_url, tiny_bank

from mcllava.assistant import PersonalAssistant
from mcllava.bank import ConceptBank
from mcllava.cli import quiet_libraries
from mcllava.multibank import SharedBase
from mcllava.server import ServerLimits, create_app

NAME = "many_banks"


def make_banks(template: Path, folder: Path, n: int) -> list[Path]:
    """`n` banks from `template`: concepts renamed with the bank's number, rows moved by 1% seeded noise."""
    bank = ConceptBank.load(template)
    paths = []
    for i in range(n):
        g = torch.Generator().manual_seed(i)
        ids = [f"{cid}{i:03d}" for cid in bank.concept_ids]
        scale = bank.input_rows.float().std().item() * 0.01
        moved = lambda t: None if t is None else t + torch.randn(t.shape, generator=g) * scale  # noqa: E731
        copy = replace(  # the template's base, k and recipe; renamed concepts, moved rows, no metrics
            bank,
            concept_ids=ids,
            input_rows=moved(bank.input_rows),
            head_rows=moved(bank.head_rows),
            locator_refs={
                new: bank.locator_refs[old] for old, new in zip(bank.concept_ids, ids) if old in bank.locator_refs
            },
            display={
                new: {**(bank.display.get(old) or {}), "name": f"{(bank.display.get(old) or {}).get('name', old)} {i}"}
                for old, new in zip(bank.concept_ids, ids)
            },
            recipe=dict(bank.recipe),
            metrics={},
            path=None,
        )
        paths.append(copy.save(folder / f"bank{i:03d}"))
    return paths


def request(bank: ConceptBank, model: str | None, max_tokens: int) -> dict:
    question = f"Is <{bank.concept_ids[0]}> in this photo?"
    content = [{"type": "text", "text": question}, {"type": "image_url", "image_url": {"url": photo_url()}}]
    return {"model": model or "any", "messages": [{"role": "user", "content": content}], "max_tokens": max_tokens}


def answer(client: TestClient, body: dict) -> tuple[float, str]:
    start = time.perf_counter()
    r = client.post("/v1/chat/completions", json=body)
    ms = (time.perf_counter() - start) * 1000
    if r.status_code != 200:
        raise RuntimeError(f"the server answered {r.status_code}: {r.text[:300]}")
    return ms, r.json()["choices"][0]["message"]["content"]


def load(folder: Path, banks: int, prompt_caches: int):
    """The server of the first `banks` banks of `folder` (one bank: a plain assistant, as `mcllava serve BANK`)."""
    paths = sorted(folder.iterdir())[:banks]
    if banks == 1:
        return create_app(PersonalAssistant.load(paths[0]), limits=LIMITS)
    return create_app(SharedBase.load(paths, prompt_caches=prompt_caches), limits=LIMITS)


LIMITS = ServerLimits(max_new_tokens=64)


def memory_child(folder: Path, banks: int, warm: int, max_tokens: int, prompt_caches: int) -> dict:
    """Run in a fresh process: RSS after loading, and after `warm` answers spread over the first banks."""
    quiet_libraries()
    before = rss_mb()
    client = TestClient(load(folder, banks, prompt_caches))
    loaded = rss_mb()
    paths = sorted(folder.iterdir())[:banks]
    for j in range(warm):
        path = paths[j % len(paths)]
        answer(client, request(ConceptBank.load(path), path.name if banks > 1 else None, max_tokens))
    return {
        "banks": banks,
        "rss_start_mb": before,
        "rss_loaded_mb": loaded,
        "rss_after_answers_mb": rss_mb(),
        "answers": warm,
    }


def memory(folder: Path, banks: int, args) -> dict:
    cmd = [
        sys.executable,
        __file__,
        "--child-memory",
        str(banks),
        "--child-folder",
        str(folder),
        "--warm",
        str(args.warm),
        "--max-tokens",
        str(args.max_tokens),
        "--prompt-caches",
        str(args.prompt_caches),
    ]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def latency(folder: Path, args) -> dict:
    """Both servers in this process, requests alternating between them (the same CPU weather for each)."""
    paths = sorted(folder.iterdir())
    banks = [ConceptBank.load(p) for p in paths]
    one, many = (
        TestClient(load(folder, 1, args.prompt_caches)),
        TestClient(load(folder, len(paths), args.prompt_caches)),
    )
    first_one, first_many = (
        answer(one, request(banks[0], None, args.max_tokens)),
        answer(many, request(banks[0], paths[0].name, args.max_tokens)),
    )
    assert first_one[1] == first_many[1], ("bank 0 answers differently on the two servers", first_one[1], first_many[1])
    answer(one, request(banks[0], None, args.max_tokens))  # the prompt caches learn their prefix on the second answer
    times: dict[str, list[float]] = {
        "one bank": [],
        "one bank, no prompt cache": [],
        "many: same bank": [],
        "many: round the banks": [],
    }
    cache = one.app.state.server.bank.assistant.backbone.prompt_cache
    for r in range(args.answers):
        ms, text = answer(one, request(banks[0], None, args.max_tokens))
        times["one bank"].append(ms)
        cache.enabled = False  # what a bank whose prompt cache is cold costs, on the one-bank server
        ms, _ = answer(one, request(banks[0], None, args.max_tokens))
        cache.enabled = True
        times["one bank, no prompt cache"].append(ms)
        ms, same = answer(many, request(banks[0], paths[0].name, args.max_tokens))
        times["many: same bank"].append(ms)
        assert same == text, ("bank 0 answers differently on the two servers", text, same)
        i = 1 + r % (len(paths) - 1)
        ms, _ = answer(many, request(banks[i], paths[i].name, args.max_tokens))
        times["many: round the banks"].append(ms)
    return {
        "answer_ms": {
            k: {
                "median": statistics.median(v),
                "mean": statistics.fmean(v),
                "min": min(v),
                "all": [round(x, 1) for x in v],
            }
            for k, v in times.items()
        },
        "answer_bank0": first_one[1],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bank", type=Path, help="a trained bank to copy")
    ap.add_argument("--tiny", action="store_true", help="an untrained tiny bank instead (plumbing only)")
    ap.add_argument("--banks", type=int, default=100)
    ap.add_argument("--answers", type=int, default=20, help="timed answers per arm")
    ap.add_argument("--warm", type=int, default=3, help="answers before the memory reading")
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--prompt-caches", type=int, default=8)
    ap.add_argument("--out", type=Path, default=OUT)
    ap.add_argument("--child-memory", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--child-folder", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child_memory:
        print(
            json.dumps(
                memory_child(args.child_folder, args.child_memory, args.warm, args.max_tokens, args.prompt_caches)
            )
        )
        return
    quiet_libraries()
    with tempfile.TemporaryDirectory(prefix="many-banks-") as tmp:
        template = tiny_bank(Path(tmp)) if args.tiny else args.bank
        if template is None:
            ap.error("give --bank BANK or --tiny")
        folder = Path(tmp) / "banks"
        started = time.perf_counter()
        paths = make_banks(template, folder, args.banks)
        bank_bytes = ConceptBank.size_bytes(paths[0])
        mem_one, mem_many = memory(folder, 1, args), memory(folder, args.banks, args)
        lat = latency(folder, args)
    extra = {k: (mem_many[k] - mem_one[k]) for k in ("rss_loaded_mb", "rss_after_answers_mb")}
    per_bank = {k: v / (args.banks - 1) for k, v in extra.items()}
    med = {k: v["median"] for k, v in lat["answer_ms"].items()}
    results = {
        "benchmark": NAME,
        "template": "tiny (untrained)" if args.tiny else str(args.bank),
        "settings": {k: str(v) for k, v in vars(args).items()},
        "machine": platform.platform(),
        "torch_threads": torch.get_num_threads(),
        "bank_file_bytes": bank_bytes,
        "memory": {
            "one bank": mem_one,
            "many banks": mem_many,
            "above one bank_mb": extra,
            "per extra bank_mb": per_bank,
        },
        **lat,
        "latency_ratio": {k: med[k] / med["one bank"] for k in med},
        "seconds": time.perf_counter() - started,
    }
    panels = [
        {
            "title": f"resident memory (MB), bank files {bank_bytes / 1024:.0f} KiB each",
            "bars": {
                "loaded": {"1 bank": mem_one["rss_loaded_mb"], f"{args.banks} banks": mem_many["rss_loaded_mb"]},
                f"after {args.warm} answers": {
                    "1 bank": mem_one["rss_after_answers_mb"],
                    f"{args.banks} banks": mem_many["rss_after_answers_mb"],
                },
            },
        },
        {"title": f"answer latency, median ms ({args.answers} answers each)", "bars": {"": med}},
    ]
    write_results(args.out, NAME, results, panels)
    print(json.dumps({"per extra bank MB": per_bank, "bank file KiB": bank_bytes / 1024, "median ms": med}, indent=2))


if __name__ == "__main__":
    main()
