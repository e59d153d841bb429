"""Hostile and odd input that used to get through, and the OpenAI conventions clients rely on: thin images,
invalid text, long questions, an empty key, DNS rebinding, slow clients, `stop`, `n`, unsupported parameters,
`stream_options`, `GET /v1/models/{id}` and the error shape."""

from __future__ import annotations

import json
import socket
import time

import pytest
from fastapi.testclient import TestClient
from PIL import Image

from mcllava.backbone import MAX_ASPECT
from mcllava.errors import McLlavaError
from mcllava.server import ChatCompletionChunk, ServerLimits, create_app
from mcllava.server.params import StopText
from mcllava.testing import data_url, make_bank, make_base, png_bytes, red_photo, serving

LOCAL = "http://localhost"
LIMITS = ServerLimits(
    max_body_bytes=300_000,
    max_image_bytes=100_000,
    max_pixels=1_000_000,
    max_text_chars=500,
    max_question_tokens=60,
    max_messages=4,
    max_new_tokens=8,
    max_queue=16,
)


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory, tokenizer_dir):
    return make_base(tokenizer_dir, tmp_path_factory.mktemp("hostile") / "base")


@pytest.fixture(scope="module")
def assistant(base_dir):
    from mcllava.assistant import PersonalAssistant

    return PersonalAssistant.load(make_bank(base_dir, base_dir.parent / "bank"), str(base_dir))


@pytest.fixture(scope="module")
def client(assistant):
    return TestClient(create_app(assistant, limits=LIMITS), base_url=LOCAL)


def chat(question: str = "Is <bo> in this photo?", image: Image.Image | None = None, **extra) -> dict:
    content = [{"type": "text", "text": question}] + (
        [{"type": "image_url", "image_url": {"url": data_url(image)}}] if image else []
    )
    return {"model": "x", "messages": [{"role": "user", "content": content}], "max_tokens": 8, **extra}


def error_of(response, status: int, param: str | None = "?") -> dict:
    """The OpenAI-shaped error of a response with this status (and this param, unless "?")."""
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    if param != "?":
        assert body["error"]["param"] == param, body
    return body["error"]


# ------------------------------------------------------------------------------------------------ images


def test_a_thin_image_is_refused_by_its_aspect_ratio(client):
    thin = Image.new("RGB", (8, 2000), (90, 90, 90))  # 16,000 pixels: far under the pixel limit
    for request in (
        lambda: client.post("/v1/chat/completions", json=chat(image=thin)),
        lambda: client.post("/v1/locate", files={"image": ("t.png", png_bytes(thin), "image/png")}),
    ):
        assert "250 times longer than wide; the limit is 20 times" in error_of(request(), 413)["message"]
    assert (
        client.post("/v1/locate", json={"image": data_url(Image.new("RGB", (20 * 8, 8)))}).status_code == 200
    )  # 20:1 is fine


def test_the_image_processor_never_gets_a_thin_strip(assistant, monkeypatch):
    """The CLIP processor stretches the short side to the model's input size; a strip must be cut first, so that
    the work is bounded by the input size, not by the strip's length (8x150000 took gigabytes)."""
    backbone = assistant.backbone
    seen: list[tuple[int, int]] = []
    processor = backbone.processor.image_processor

    class Spy:
        def __call__(self, images, **kwargs):
            seen.extend(im.size for im in images)
            return processor(images, **kwargs)

        def __getattr__(self, name):
            return getattr(processor, name)

    monkeypatch.setattr(backbone.processor, "image_processor", Spy())
    strip = Image.new("RGB", (30_000, 6), (200, 30, 30))
    strip.paste((10, 200, 10), (14_997, 0, 15_003, 6))  # a green middle, the only part the centre crop keeps
    tall = strip.transpose(Image.Transpose.ROTATE_90)
    px = backbone.pixel_values([strip, tall, red_photo()])
    assert seen[:2] == [(24, 6), (6, 24)] and seen[2] == red_photo().size  # a normal photo goes in as it is
    assert all(max(w, h) <= MAX_ASPECT * min(w, h) for w, h in seen)
    assert px.shape[0] == 3 and px.shape[-2:] == (backbone.image_size, backbone.image_size)
    mid = px[0, :, backbone.image_size // 2, backbone.image_size // 2]
    assert mid[1] > mid[0]  # the middle of the strip is what the model sees, as without the cut


# -------------------------------------------------------------------------------------------------- text


def test_a_lone_surrogate_is_a_400_naming_the_message(client):
    raw = b'{"messages": [{"role": "user", "content": "hi \\ud800"}], "max_tokens": 4}'
    for body in (raw, raw[:-1] + b', "stream": true}'):
        r = client.post("/v1/chat/completions", content=body, headers={"content-type": "application/json"})
        err = error_of(r, 400, "messages[0].content")
        assert "lone surrogate (U+D800)" in err["message"] and r.headers["content-type"].startswith("application/json")
    r = client.post(
        "/v1/chat/completions",
        content=b'{"messages": [{"role": "user", "content": "hi"}], "stop": "\\udc00"}',
        headers={"content-type": "application/json"},
    )
    error_of(r, 400, "stop")


def test_a_question_is_limited_in_tokens_and_by_the_context(client, assistant):
    gothic = "\U00010348" * 40  # 40 characters, several tokens each
    err = error_of(client.post("/v1/chat/completions", json=chat(gothic)), 413, "messages")
    assert "tokens long; the limit is 60 tokens" in err["message"] and err["code"] == "context_length_exceeded"
    assert client.post("/v1/chat/completions", json=chat("Who is <bo>?")).status_code == 200
    roomy = TestClient(
        create_app(assistant, limits=ServerLimits(max_question_tokens=10**6, max_new_tokens=8)), base_url=LOCAL
    )
    err = error_of(roomy.post("/v1/chat/completions", json=chat("\U00010348" * 400)), 413, "messages")
    assert "the model reads at most 512 tokens" in err["message"]


# ------------------------------------------------------------------------------------------------ access


def test_an_empty_api_key_is_an_error(assistant, tmp_path):
    from typer.testing import CliRunner

    from mcllava.cli import app

    for key in ("", "  "):
        with pytest.raises(McLlavaError, match="API key is empty"):
            create_app(assistant, api_key=key)
    for args, env in ((["--api-key", ""], {}), ([], {"MCLLAVA_API_KEY": ""})):
        result = CliRunner().invoke(app, ["serve", str(tmp_path / "no-bank"), *args], env=env)
        assert result.exit_code == 2 and "API key is empty" in result.output, result.output


def test_without_a_key_only_the_started_hosts_and_same_origin_are_answered(assistant):
    app = create_app(assistant, limits=LIMITS, allowed_hosts=["0.0.0.0", "photos.lan"])
    upload = {"files": {"image": ("a.png", png_bytes(red_photo()), "image/png")}}
    for host in ("evil.example", "evil.example:8000", "localhost.evil.example", "127.0.0.1.nip.io", ""):
        client = TestClient(app, base_url="http://x")
        err = error_of(client.get("/v1/concepts", headers={"host": host}), 400)
        assert err["code"] == "invalid_host"
        assert client.get("/", headers={"host": host}).status_code == 400  # the page too: DNS rebinding reads it
        assert client.post("/v1/locate", headers={"host": host}, **upload).status_code == 400
    for base in (
        "http://localhost:8000",
        "http://127.0.0.1:9",
        "http://[::1]:8000",
        "http://photos.lan",
        "http://LOCALHOST.",
    ):
        assert TestClient(app, base_url=base).get("/v1/concepts").status_code == 200, base
    client = TestClient(app, base_url="http://127.0.0.1:8000")
    for origin in ("https://evil.example", "null", "http://127.0.0.1.evil.example"):
        assert error_of(client.post("/v1/locate", headers={"origin": origin}, **upload), 403)["code"] == "cross_origin"
    assert client.post("/v1/locate", headers={"origin": "http://127.0.0.1:8000"}, **upload).status_code == 200
    keyed = TestClient(create_app(assistant, api_key="k", limits=LIMITS), base_url="http://evil.example")
    assert keyed.get("/v1/concepts", headers={"X-API-Key": "k", "origin": "https://evil.example"}).status_code == 200
    anyone = TestClient(create_app(assistant, limits=LIMITS, allowed_hosts=["*"]), base_url="http://evil.example")
    assert anyone.get("/v1/concepts").status_code == 200


# ---------------------------------------------------------------------------------------------- slow clients


def _closed_within(sock: socket.socket, seconds: float, trickle: bytes = b"") -> tuple[bool, bytes]:
    """Whether the server closes `sock` within `seconds` while we send `trickle` a byte at a time; what it sent."""
    got, deadline = b"", time.monotonic() + seconds
    sock.settimeout(0.1)
    for byte in trickle * 1000:
        if time.monotonic() > deadline:
            break
        try:
            sock.sendall(bytes([byte]))
            chunk = sock.recv(4096)
            if not chunk:
                return True, got
            got += chunk
        except TimeoutError:
            continue
        except OSError:
            return True, got
    while time.monotonic() < deadline:
        try:
            chunk = sock.recv(4096)
        except TimeoutError:
            continue
        except OSError:
            return True, got
        if not chunk:
            return True, got
        got += chunk
    return False, got


def test_slow_clients_are_cut_off(assistant):
    limits = ServerLimits(
        header_timeout_s=1.0, body_timeout_s=1.0, keep_alive_s=0.5, max_connections=3, max_new_tokens=4
    )
    app = create_app(assistant, limits=limits)
    with serving(app, limits=limits) as url:
        host, port = url.removeprefix("http://").split(":")
        connect = lambda: socket.create_connection((host, int(port)))  # noqa: E731
        slow_head = connect()
        slow_head.sendall(b"GET /health HTTP/1.1\r\nHost: localhost\r\n")
        closed, _ = _closed_within(slow_head, 4.0, trickle=b"X-Pad: y\r\n")
        assert closed  # a byte every 0.1 s does not keep a head alive past its deadline
        slow_body = connect()
        slow_body.sendall(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
            b'Content-Length: 400\r\n\r\n{"messages": '
        )
        closed, got = _closed_within(slow_body, 4.0, trickle=b" ")
        assert closed and got.startswith(b"HTTP/1.1 408") and b"did not arrive within 1 s of its headers" in got
        idle = [connect() for _ in range(3)]  # open, silent: the connection cap counts them
        time.sleep(0.1)
        busy = connect()
        busy.sendall(b"GET /health HTTP/1.1\r\nHost: localhost\r\n\r\n")
        busy.settimeout(3)
        assert busy.recv(4096).startswith(b"HTTP/1.1 503")
        assert all(_closed_within(s, 4.0)[0] for s in idle)  # and the header deadline frees them
        for s in [slow_head, slow_body, busy, *idle]:
            s.close()


# ------------------------------------------------------------------------------------------------ OpenAI


def test_models_can_be_retrieved_by_id(client):
    listed = client.get("/v1/models").json()["data"][0]
    assert client.get(f"/v1/models/{listed['id']}").json() == listed
    err = error_of(client.get("/v1/models/gpt-4o"), 404, "model")
    assert err["code"] == "model_not_found" and listed["id"] in err["message"]


def test_stop_ends_the_answer_before_the_stop_string(client):
    plain = client.post("/v1/chat/completions", json=chat("Who is <ana>?")).json()["choices"][0]["message"]["content"]
    assert len(plain) >= 3, plain
    stop = plain[len(plain) // 2 : len(plain) // 2 + 2]
    cut = plain[: plain.index(stop)]
    for form in (stop, ["never-said", stop]):
        r = client.post("/v1/chat/completions", json=chat("Who is <ana>?", stop=form)).json()
        assert r["choices"][0]["message"]["content"] == cut and r["choices"][0]["finish_reason"] == "stop"
        with client.stream("POST", "/v1/chat/completions", json=chat("Who is <ana>?", stop=form, stream=True)) as s:
            events = [line[6:] for line in s.iter_lines() if line.startswith("data: ")]
        chunks = [ChatCompletionChunk.model_validate_json(e) for e in events[:-1]]
        assert "".join(c.choices[0].delta.content or "" for c in chunks) == cut
        assert chunks[-1].choices[0].finish_reason == "stop"
    error_of(client.post("/v1/chat/completions", json=chat(stop=["a", "b", "c", "d", "e"])), 400, "stop")


def test_stop_text_holds_back_only_what_could_start_a_stop():
    stop = StopText(["END", "xyz"])
    pieces = [stop.feed(p) for p in ["Hello E", "N", "ough; x", "y", " no", " more E", "ND here"]]
    assert pieces == ["Hello ", "", "ENough; ", "", "xy no", " more ", ""] and stop.stopped and stop.finish() == ""
    assert StopText([]).cut("as is") == "as is" and StopText(["zz"]).cut("ends in z") == "ends in z"


@pytest.mark.parametrize(
    "extra, param",
    [
        ({"n": 2}, "n"),
        ({"response_format": {"type": "json_object"}}, "response_format"),
        ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {}}}}, "response_format"),
        ({"logprobs": True}, "logprobs"),
        ({"top_logprobs": 3}, "top_logprobs"),
        ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
        ({"tool_choice": "required"}, "tool_choice"),
        ({"functions": [{"name": "f"}]}, "functions"),
    ],
)
def test_what_the_model_cannot_do_is_refused_naming_the_parameter(client, extra, param):
    err = error_of(client.post("/v1/chat/completions", json=chat(**extra)), 400, param)
    assert err["type"] == "invalid_request_error" and param in err["message"]


def test_what_the_model_can_do_is_accepted(client):
    for extra in (
        {"n": 1},
        {"response_format": {"type": "text"}},
        {"logprobs": False},
        {"tool_choice": "none"},
        {"tools": []},
        {"temperature": 0.7, "top_p": 0.9, "seed": 1, "presence_penalty": 0.1, "user": "me"},
    ):
        assert client.post("/v1/chat/completions", json=chat(**extra)).status_code == 200, extra


def test_schema_errors_are_400_naming_the_parameter(client):
    err = error_of(
        client.post("/v1/chat/completions", json={"messages": [{"role": "robot", "content": "hi"}]}),
        400,
        "messages[0].role",
    )
    assert err["code"] == "invalid_value"
    assert (
        error_of(client.post("/v1/chat/completions", json={"model": "x"}), 400, "messages")["code"]
        == "missing_required_parameter"
    )
    assert json.loads(client.get("/nowhere").text)["error"]["type"] == "not_found"
