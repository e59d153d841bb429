"""The HTTP API: OpenAI-shaped chat (plain and streamed), locate, concepts, auth, limits, errors, queueing, schema."""

from __future__ import annotations

import base64
import io
import json
import struct
import threading
import time
import zlib
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from fastapi.routing import APIRoute
from fastapi.testclient import TestClient
from PIL import Image

from mcllava.errors import McLlavaError
from mcllava.server import ChatCompletion, ChatCompletionChunk, LocateResponse, ModelGate, ServerLimits, create_app
from mcllava.testing import data_url, make_bank, make_base, png_bytes, red_photo, serving

KEY = "s3cret-key"
LOCAL = "http://localhost"  # a server without a key answers only the hosts it was started for
LIMITS = ServerLimits(
    max_body_bytes=300_000,
    max_image_bytes=100_000,
    max_pixels=1_000_000,
    max_text_chars=500,
    max_messages=4,
    max_new_tokens=8,
    max_queue=16,
)


@pytest.fixture(scope="module")
def bank_dir(tmp_path_factory, tokenizer_dir):
    root = tmp_path_factory.mktemp("server")
    return make_bank(make_base(tokenizer_dir, root / "base"), root / "bank")


@pytest.fixture(scope="module")
def assistant(bank_dir):
    from mcllava.assistant import PersonalAssistant

    return PersonalAssistant.load(bank_dir, str(bank_dir.parent / "base"))


@pytest.fixture(scope="module")
def app(assistant):
    return create_app(assistant, limits=LIMITS)


@pytest.fixture(scope="module")
def client(app):
    return TestClient(app, base_url=LOCAL)


def ask(question="Is <bo> in this photo?", image=True, **extra) -> dict:
    content = [{"type": "text", "text": question}] + (
        [{"type": "image_url", "image_url": {"url": data_url(red_photo())}}] if image else []
    )
    return {
        "model": "anything",
        "messages": [{"role": "system", "content": "ignored"}, {"role": "user", "content": content}],
        "max_tokens": 6,
        **extra,
    }


def error_of(response, status: int) -> str:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    for leak in ("/tmp", "Traceback", 'File "', "site-packages"):
        assert leak not in response.text
    return body["error"]["message"]


# ----------------------------------------------------------------------------------------------- chat


def test_chat_answers_in_openai_shape_like_the_assistant(client, assistant):
    r = client.post("/v1/chat/completions", json=ask(mcllava={"return_image": True}))
    assert r.status_code == 200, r.text
    out = ChatCompletion.model_validate(r.json())
    assert out.object == "chat.completion" and out.id.startswith("chatcmpl-") and out.model.startswith("mcllava")
    expected = assistant.respond(red_photo(), "Is <bo> in this photo?", max_new_tokens=6)
    assert out.choices[0].message.content == expected.text
    assert out.choices[0].finish_reason in ("stop", "length")
    assert out.usage.prompt_tokens > assistant.backbone.num_image_tokens and 1 <= out.usage.completion_tokens <= 6
    assert out.usage.total_tokens == out.usage.prompt_tokens + out.usage.completion_tokens
    assert out.mcllava.marks == {"1": "bo"}
    assert {l.concept: l.present for l in out.mcllava.locations} == {"bo": True, "ana": False}
    marked = Image.open(io.BytesIO(base64.b64decode(out.mcllava.marked_image.split(",", 1)[1])))
    assert marked.size == red_photo().size


def test_chat_without_image_or_visual_prompt(client, assistant):
    r = client.post("/v1/chat/completions", json=ask("Who is <ana>?", image=False))
    assert r.status_code == 200
    assert r.json()["choices"][0]["message"]["content"] == assistant.answer(None, "Who is <ana>?", max_new_tokens=6)
    r = client.post("/v1/chat/completions", json=ask(mcllava={"visual_prompt": False, "return_image": True}))
    assert r.json()["mcllava"] == {"marks": {}, "locations": [], "marked_image": None, "parts": {}}


def stream_chunks(client, payload) -> list[ChatCompletionChunk]:
    with client.stream("POST", "/v1/chat/completions", json=payload) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = [line[len("data: ") :] for line in r.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    return [ChatCompletionChunk.model_validate_json(e) for e in events[:-1]]


def test_chat_streams_server_sent_events(client):
    """As OpenAI streams: usage only with stream_options.include_usage, then in a last chunk with no choices."""
    plain = client.post("/v1/chat/completions", json=ask()).json()
    chunks = stream_chunks(client, ask(stream=True))
    assert chunks[0].choices[0].delta.role == "assistant" and len({c.id for c in chunks}) == 1
    text = "".join(c.choices[0].delta.content or "" for c in chunks)
    assert text.strip() == plain["choices"][0]["message"]["content"]
    last = chunks[-1]
    assert last.choices[0].finish_reason == plain["choices"][0]["finish_reason"] and last.mcllava.marks == {"1": "bo"}
    assert all(c.usage is None for c in chunks)
    counted = stream_chunks(client, ask(stream=True, stream_options={"include_usage": True}))
    *rest, usage = counted
    assert usage.choices == [] and usage.usage.model_dump() == plain["usage"] and all(c.usage is None for c in rest)
    assert rest[-1].choices[0].finish_reason == plain["choices"][0]["finish_reason"]
    assert "".join(c.choices[0].delta.content or "" for c in rest) == text
    assert all(
        c.usage is None for c in stream_chunks(client, ask(stream=True, stream_options={"include_usage": False}))
    )


@pytest.mark.parametrize("question", ["Are <bo> and <ana> both in this photo?", "Describe this photo."])
def test_an_answer_built_from_one_question_per_concept_streams_whole(client, question):
    """ "Are <bo> and <ana> both here?" and a caption are answered one concept at a time first, so they are sent
    whole, not token by token."""
    plain = client.post("/v1/chat/completions", json=ask(question)).json()
    assert set(plain["mcllava"]["parts"]) == {"bo", "ana"}
    content, found = (
        plain["choices"][0]["message"]["content"],
        [c for c, t in plain["mcllava"]["parts"].items() if t.startswith("Yes")],
    )
    assert content.startswith(("Yes", "No")) if "both" in question else all(f"<{c}>" in content for c in found)
    *chunks, usage = stream_chunks(client, ask(question, stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == plain["choices"][0]["message"]["content"]
    assert usage.usage.model_dump() == plain["usage"] and chunks[-1].mcllava.parts == plain["mcllava"]["parts"]
    assert plain["usage"]["completion_tokens"] >= 2  # both questions' answers are counted


@pytest.mark.parametrize("image", [True, False])
def test_a_ranked_choice_and_a_single_word_stream_whole(client, image):
    """A lettered choice is answered by ranking its options and "Answer ... with a single word" by the bare word:
    the assistant writes the final text, so it is sent whole."""
    choice = "What colour is <bo>?\nA. red\nB. blue\nAnswer with the option's letter from the given choices directly."
    plain = client.post("/v1/chat/completions", json=ask(choice, image=image)).json()
    content = plain["choices"][0]["message"]["content"]
    scores = {k: float(v) for k, v in plain["mcllava"]["parts"].items()}
    assert set(scores) == {"A", "B"} and content == max(scores, key=scores.get)
    chunks = stream_chunks(client, ask(choice, image=image, stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == content
    if image:
        word = "Is <bo> in this photo? Answer the question using a single word Yes or No."
        plain = client.post("/v1/chat/completions", json=ask(word)).json()["choices"][0]["message"]["content"]
        streamed = "".join(c.choices[0].delta.content or "" for c in stream_chunks(client, ask(word, stream=True)))
        assert streamed == plain and (plain in ("Yes", "No") or not plain.lower().startswith(("yes", "no")))


# --------------------------------------------------------------------------------------- locate, concepts


def test_locate_from_json_and_from_an_upload(client):
    r = client.post("/v1/locate", json={"image": data_url(red_photo()), "return_image": True})
    out = LocateResponse.model_validate(r.json())
    assert (out.width, out.height) == red_photo().size and out.marks == {"1": "bo"}
    bo, ana = out.locations
    assert (
        bo.concept == "bo"
        and bo.name == "Bo"
        and bo.present
        and bo.box is not None
        and not ana.present
        and ana.box is None
    )
    assert out.marked_image.startswith("data:image/jpeg;base64,")
    r = client.post("/v1/locate", files={"image": ("../../etc/passwd", png_bytes(red_photo()), "image/png")})
    upload = LocateResponse.model_validate(r.json())
    assert upload.locations == out.locations and upload.marked_image is None


def test_concepts_health_and_models(client, tmp_path, assistant):
    data = client.get("/v1/concepts").json()["data"]
    assert [(c["id"], c["token"], c["name"], c["category"], c["thumbnail"]) for c in data] == [
        ("bo", "<bo>", "Bo", "dog", None),
        ("ana", "<ana>", "Ana", "person", None),
    ]
    (tmp_path / "bo" / "train").mkdir(parents=True)
    red_photo(80).save(tmp_path / "bo" / "train" / "0.png")
    with_thumbs = (
        TestClient(create_app(assistant, limits=LIMITS, concepts_dir=tmp_path), base_url=LOCAL)
        .get("/v1/concepts")
        .json()["data"]
    )
    assert with_thumbs[0]["thumbnail"].startswith("data:image/jpeg;base64,") and with_thumbs[1]["thumbnail"] is None
    assert client.get("/health").json()["status"] == "ok"
    assert client.get("/v1/models").json()["data"][0]["id"].startswith("mcllava")


def test_web_page_and_assets_are_served(client):
    page = client.get("/")
    assert (
        page.status_code == 200
        and "<title>" in page.text
        and "default-src 'self'" in page.headers["content-security-policy"]
    )
    for asset in ("/static/app.js", "/static/style.css"):
        assert client.get(asset).status_code == 200


# ------------------------------------------------------------------------------------------------ auth


def test_every_route_but_health_needs_the_key(assistant):
    app = create_app(assistant, api_key=KEY, limits=LIMITS)
    client = TestClient(app)
    routes = [(m, r.path) for r in app.routes if isinstance(r, APIRoute) and r.include_in_schema for m in r.methods]
    assert {p for _, p in routes} >= {"/health", "/v1/chat/completions", "/v1/locate", "/v1/concepts", "/v1/models"}
    for method, path in routes:
        if path == "/health":
            assert client.request(method, path).status_code == 200
            continue
        for headers in (
            {},
            {"Authorization": "Bearer wrong"},
            {"X-API-Key": KEY + "x"},
            {"Authorization": f"Basic {KEY}"},
        ):
            r = client.request(method, path, headers=headers, json={})
            assert "key" in error_of(r, 401) and r.headers["www-authenticate"] == "Bearer"
    for headers in ({"Authorization": f"Bearer {KEY}"}, {"X-API-Key": KEY}):
        assert client.get("/v1/concepts", headers=headers).status_code == 200
    # the key is checked before the body is read: a malformed body without the key is 401, not 400
    for body in (b"{not json", b"x" * 100):
        r = client.post("/v1/chat/completions", content=body, headers={"content-type": "application/json"})
        assert "key" in error_of(r, 401)
    r = client.post(
        "/v1/chat/completions", content=b"{not json", headers={"content-type": "application/json", "X-API-Key": KEY}
    )
    error_of(r, 400)
    assert client.get("/").status_code == 200 and client.get("/static/app.js").status_code == 200


# ---------------------------------------------------------------------------------------- limits, errors


def _png_header(width: int, height: int) -> bytes:
    """A PNG that claims a huge size: a signature and IHDR only (a decompression bomb's header)."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    chunk = lambda kind, data: struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))  # noqa: E731
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b"")


def _with_image(url: str) -> dict:
    return {
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "Is <bo> here?"},
                    {"type": "image_url", "image_url": {"url": url}},
                ],
            }
        ]
    }


def _b64(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode()


BAD_CHATS = {
    "remote url": (_with_image("https://example.com/a.png"), 400, "remote"),
    "file url": (_with_image("file:///etc/passwd"), 400, "data URL"),
    "not base64": (_with_image("data:image/png;base64,@@@@"), 400, "base64"),
    "not an image": (_with_image(_b64(b"GIF89a" + b"\0" * 64)), 400, "cannot read"),
    "empty image": (_with_image("data:image/png;base64,"), 400, "empty"),
    "truncated png": (_with_image(_b64(png_bytes(red_photo())[:120])), 400, "image"),
    "tiny image": (_with_image(_b64(png_bytes(Image.new("RGB", (4, 4))))), 400, "too small"),
    "too many pixels": (_with_image(_b64(_png_header(2000, 1000))), 413, "pixels"),
    "decompression bomb": (_with_image(_b64(_png_header(100_000, 100_000))), 413, "pixels"),
    "image bytes": (_with_image(_b64(b"\0" * 150_000)), 413, "100,000 bytes"),
    "two images": (
        {
            "messages": [
                {
                    "role": "user",
                    "content": [{"type": "text", "text": "?"}]
                    + [{"type": "image_url", "image_url": {"url": data_url(red_photo())}}] * 2,
                }
            ]
        },
        400,
        "one photo",
    ),
    "text length": (ask("x" * 501, image=False), 413, "500 characters"),
    "messages": ({"messages": [{"role": "user", "content": "hi"}] * 5}, 413, "limit is 4"),
    "max tokens": (ask(image=False, max_tokens=9), 413, "limit is 8"),
    "no user message": ({"messages": [{"role": "system", "content": "hi"}]}, 400, "no user message"),
    "empty question": ({"messages": [{"role": "user", "content": "   "}]}, 400, "no text"),
    "image placeholder": (ask("Is <image> here?", image=False), 400, "image"),
    "no messages": ({"messages": []}, 400, "messages"),
    "bad role": ({"messages": [{"role": "robot", "content": "hi"}]}, 400, "role"),
    "n": ({"messages": [{"role": "user", "content": "hi"}], "n": 2}, 400, "n must be 1"),
    "bad part": ({"messages": [{"role": "user", "content": [{"type": "video", "url": "x"}]}]}, 400, "content"),
}


@pytest.mark.parametrize("case", list(BAD_CHATS))
def test_bad_chat_requests_get_a_clear_4xx(client, case):
    payload, status, words = BAD_CHATS[case]
    assert words in error_of(client.post("/v1/chat/completions", json=payload), status)


def test_body_limits_and_bad_bodies(client, app):
    big = json.dumps({"image": "x" * 400_000}).encode()
    assert "300,000 bytes" in error_of(
        client.post("/v1/locate", content=big, headers={"content-type": "application/json"}), 413
    )

    def chunks():  # no Content-Length: counted as it streams in
        for _ in range(40):
            yield b" " * 10_000

    assert "300,000 bytes" in error_of(
        client.post("/v1/chat/completions", content=chunks(), headers={"content-type": "application/json"}), 413
    )
    error_of(
        client.post("/v1/chat/completions", content=b"{not json", headers={"content-type": "application/json"}), 400
    )
    error_of(client.post("/v1/locate", content=b"hello", headers={"content-type": "text/plain"}), 415)
    assert "JSON" in error_of(
        client.post("/v1/chat/completions", content=b"{}", headers={"content-type": "text/plain"}), 415
    )
    error_of(client.post("/v1/locate", json={"return_image": True}), 400)
    error_of(client.post("/v1/locate", files={"photo": ("a.png", b"x", "image/png")}), 400)
    error_of(
        client.post(
            "/v1/locate",
            files={"image": ("a.png", png_bytes(red_photo()), "image/png")},
            data={"return_image": "maybe"},
        ),
        400,
    )
    error_of(client.get("/nowhere"), 404)
    error_of(client.delete("/v1/concepts"), 405)
    assert list(app.state.server.images.folder.iterdir()) == []  # no upload is left on disk


def test_errors_name_no_paths_and_no_internals(assistant, bank_dir, monkeypatch):
    client = TestClient(create_app(assistant, limits=LIMITS), base_url=LOCAL, raise_server_exceptions=False)

    def crash(*args, **kwargs):
        raise RuntimeError(f"boom in {bank_dir}")

    monkeypatch.setattr(assistant, "respond", crash)
    message = error_of(client.post("/v1/chat/completions", json=ask(image=False)), 500)
    assert "boom" not in message and "internal" in message

    def refuse(*args, **kwargs):
        raise McLlavaError(f"bank {bank_dir} cannot do that")

    monkeypatch.setattr(assistant, "respond", refuse)
    assert (
        error_of(client.post("/v1/chat/completions", json=ask(image=False)), 400) == "bank <server path> cannot do that"
    )
    with client.stream("POST", "/v1/chat/completions", json=ask(image=False, stream=True)) as r:
        events = [line for line in r.iter_lines() if line.startswith("data: ")]
    assert (
        json.loads(events[-2][6:])["error"]["message"] == "bank <server path> cannot do that"
        and events[-1] == "data: [DONE]"
    )


# --------------------------------------------------------------------------------------------- queueing


def test_concurrent_requests_queue_for_the_one_model(app, assistant, monkeypatch):
    inside, most = 0, 0
    count = threading.Lock()
    respond = assistant.respond

    def watched(*args, **kwargs):
        nonlocal inside, most
        with count:
            inside += 1
            most = max(most, inside)
        try:
            time.sleep(0.01)
            return respond(*args, **kwargs)
        finally:
            with count:
                inside -= 1

    monkeypatch.setattr(assistant, "respond", watched)
    with serving(app) as url, httpx.Client(base_url=url, timeout=60) as http:
        payloads = [ask(), ask("Who is <ana>?", image=False), ask(stream=False, max_tokens=3)] * 3
        with ThreadPoolExecutor(8) as pool:
            replies = list(pool.map(lambda p: http.post("/v1/chat/completions", json=p), payloads))
        single = [http.post("/v1/chat/completions", json=p) for p in payloads[:3]]
    assert all(r.status_code == 200 for r in replies) and most == 1
    answers = [r.json()["choices"][0]["message"]["content"] for r in replies]
    assert answers == [r.json()["choices"][0]["message"]["content"] for r in single] * 3


def test_a_full_queue_answers_503(assistant):
    gate = ModelGate(max_queue=1)
    gate.admit()
    with pytest.raises(Exception) as refused:
        gate.admit()
    assert refused.value.status_code == 503
    app = create_app(assistant, limits=ServerLimits(max_queue=1, max_new_tokens=8))
    client, gate = TestClient(app, base_url=LOCAL), app.state.server.bank.gate
    gate.lock.acquire()
    try:
        waiting = threading.Thread(
            target=client.post, args=("/v1/chat/completions",), kwargs={"json": ask(image=False)}
        )
        waiting.start()
        while gate._queued < 1:
            time.sleep(0.01)
        assert "busy" in error_of(client.post("/v1/chat/completions", json=ask(image=False)), 503)
    finally:
        gate.lock.release()
    waiting.join(30)


# ----------------------------------------------------------------------------------------------- schema


def test_openapi_schema_matches_the_routes(app, assistant):
    schema = TestClient(app, base_url=LOCAL).get("/openapi.json").json()
    paths = schema["paths"]
    assert set(paths) == {
        "/health",
        "/v1/chat/completions",
        "/v1/locate",
        "/v1/concepts",
        "/v1/models",
        "/v1/models/{model_id}",
    }

    def ref(op, code="200", ctype="application/json"):
        return op["responses"][code]["content"][ctype]["schema"]["$ref"].rsplit("/", 1)[1]

    chat = paths["/v1/chat/completions"]["post"]
    assert ref(chat) == "ChatCompletion" and ref(chat, ctype="text/event-stream") == "ChatCompletionChunk"
    assert chat["requestBody"]["content"]["application/json"]["schema"]["$ref"].endswith("/ChatRequest")
    locate = paths["/v1/locate"]["post"]
    assert ref(locate) == "LocateResponse" and set(locate["requestBody"]["content"]) == {
        "application/json",
        "multipart/form-data",
    }
    assert ref(paths["/v1/concepts"]["get"]) == "ConceptList" and ref(paths["/health"]["get"]) == "Health"
    for path in ("/v1/chat/completions", "/v1/locate"):
        op = next(iter(paths[path].values()))
        assert {ref(op, code) for code in ("400", "401", "403", "404", "408", "413", "415", "500", "503")} == {
            "ErrorResponse"
        }
    components = schema["components"]["schemas"]
    assert (
        "HTTPValidationError" not in components
        and not any("422" in op["responses"] for ops in paths.values() for op in ops.values())
        and {"ChatCompletionChunk", "LocateRequest", "Delta"} <= set(components)
    )
    assert "security" not in chat
    keyed = TestClient(create_app(assistant, api_key=KEY, limits=LIMITS)).get("/openapi.json").json()
    assert (
        keyed["paths"]["/v1/chat/completions"]["post"]["security"]
        and "security" not in keyed["paths"]["/health"]["get"]
    )
