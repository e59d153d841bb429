"""Cheap concept banks for tests and benchmarks: an untrained tiny base plus random concept rows, and a loopback
server to send them requests.

Nothing is trained. The locator references of the first concept are the visual tokens of `red_photo()`, so
the locator finds that concept in that photo and the assistant draws a mark; the others get random references.
"""

from __future__ import annotations

import base64
import io
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from PIL import Image, ImageDraw

from .assistant import PersonalAssistant
from .backbone import Backbone
from .bank import ConceptBank, config_hash
from .smollm2 import smollm2_tokenizer
from .tiny import build_tiny_llava
from .tokens import head_is_tied, word_embedding_norm

CONCEPTS = {"bo": {"name": "Bo", "category": "dog"}, "ana": {"name": "Ana", "category": "person"}}


def red_photo(size: int = 64) -> Image.Image:
    """A photo with a red square on grey: the first concept of `make_bank` is 'in' it."""
    im = Image.new("RGB", (size, size), (120, 120, 120))
    ImageDraw.Draw(im).rectangle((size // 4, size // 4, 3 * size // 4, 3 * size // 4), fill=(220, 40, 40))
    return im


def png_bytes(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def data_url(image: Image.Image) -> str:
    return "data:image/png;base64," + base64.b64encode(png_bytes(image)).decode("ascii")


def make_base(tokenizer_dir: Path, out: Path, tied: bool = False) -> Path:
    """An untrained tiny LLaVA saved as a checkpoint folder (model + processor)."""
    model, processor = build_tiny_llava(smollm2_tokenizer(tokenizer_dir), tied=tied)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out


def make_bank(base_dir: Path, out: Path, k: int = 2, concepts: dict = CONCEPTS, seed: int = 0) -> Path:
    """A concept bank of random rows for the base at `base_dir`, saved at `out`."""
    backbone = Backbone.load(base_dir, dtype=torch.float32, device="cpu")
    n, d, ids = len(backbone.tokenizer), backbone.hidden_size, list(concepts)
    g = torch.Generator().manual_seed(seed)
    scale = word_embedding_norm(backbone.model, n) / d**0.5
    rows = torch.randn(len(ids), k + 1, d, generator=g) * scale
    tied = head_is_tied(backbone.model)
    head = None if tied else torch.randn(len(ids), k + 1, d, generator=g) * scale
    refs = {cid: torch.randn(3, d, generator=g) for cid in ids}
    refs[ids[0]] = backbone.visual_tokens([red_photo()]).patches[0].float()
    bank = ConceptBank(
        base_model=str(base_dir),
        base_config_hash=config_hash(backbone.model.config),
        tokenizer_len_before=n,
        concept_ids=ids,
        k=k,
        hidden_size=d,
        tied_head=tied,
        input_rows=rows,
        head_rows=head,
        locator_refs=refs,
        display={cid: dict(info) for cid, info in concepts.items()},
    )
    return bank.save(out)


def make_assistant(root: Path, tokenizer_dir: Path, concepts: dict = CONCEPTS):
    """A PersonalAssistant on an untrained tiny base with a bank of random rows (base and bank under `root`)."""
    base = make_base(tokenizer_dir, root / "base")
    return PersonalAssistant.load(make_bank(base, root / "bank", concepts=concepts), base)


@contextmanager
def serving(app, timeout: float = 20.0, limits=None) -> Iterator[str]:
    """Run `app` with uvicorn on a free loopback port in a thread; yield its base URL. With `limits`
    (`ServerLimits`), uvicorn runs with the timeouts and connection cap that `mcllava serve` sets."""
    import uvicorn  # optional: the `serve` extra

    from mcllava.server import uvicorn_config

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    config = (
        uvicorn.Config(app, log_level="warning", lifespan="off")
        if limits is None
        else uvicorn_config(app, limits, log_level="warning", lifespan="off")
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(timeout)
        sock.close()
