"""Several banks on one base (`SharedBase`, `mcllava serve A B`): each answers as a server of that bank alone,
no request sees another bank's rows or cached prompts, `model` picks the bank, and a key may be limited to banks."""

from __future__ import annotations

import pytest
import torch
from fastapi.testclient import TestClient

from mcllava.assistant import PersonalAssistant
from mcllava.errors import BankError, McLlavaError
from mcllava.multibank import SharedBase, bank_folders
from mcllava.server import Server, ServerLimits, create_app
from mcllava.server.keys import KeyRing
from mcllava.testing import data_url, make_bank, make_base, red_photo

LIMITS = ServerLimits(max_new_tokens=8)
# two users' banks: both have a "bo" (one token string, different rows), each has a concept the other lacks
ALICE = {"bo": {"name": "Bo", "category": "dog"}, "ana": {"name": "Ana", "category": "person"}}
BOB = {"bo": {"name": "Bobo", "category": "cat"}, "kit": {"name": "Kit", "category": "person"}}
QUESTIONS = [
    ("Is <bo> in this photo?", True),
    ("What is <bo> doing next to <ana>?", True),
    ("Who is <kit>?", False),
    ("Describe this photo.", True),
    ("Are <bo> and <kit> both in this photo?", True),
    ("<bo><kit_1><ana_2>!", False),
]


@pytest.fixture(scope="module")
def banks(tmp_path_factory, tokenizer_dir):
    root = tmp_path_factory.mktemp("many")
    base = make_base(tokenizer_dir, root / "base")
    return {
        "alice": make_bank(base, root / "banks" / "alice", concepts=ALICE, seed=1),
        "bob": make_bank(base, root / "banks" / "bob", concepts=BOB, seed=2),
    }


@pytest.fixture(scope="module")
def shared(banks):
    return SharedBase.load([banks["alice"].parent], str(banks["alice"].parent.parent / "base"))  # a folder of banks


def alone(path) -> PersonalAssistant:
    return PersonalAssistant.load(path, str(path.parent.parent / "base"))


def test_each_bank_answers_as_it_does_alone_in_any_order(shared, banks):
    singles = {name: alone(path) for name, path in banks.items()}
    photo = red_photo()
    for name in ("alice", "bob", "alice", "bob"):  # a bank after the other still gives its own answers
        for question, with_photo in QUESTIONS:
            with shared.use(name) as assistant:
                got = assistant.respond(photo if with_photo else None, question, max_new_tokens=6)
            want = singles[name].respond(photo if with_photo else None, question, max_new_tokens=6)
            assert (got.text, got.system, got.marks, got.parts) == (want.text, want.system, want.marks, want.parts), (
                name,
                question,
            )
    assert len({id(a.backbone.model) for a in shared.assistants.values()}) == 1  # one copy of the base


def test_a_bank_sees_only_its_own_tokens_and_rows(shared, banks):
    """Other banks' token strings are plain text for a bank (as for its own server), its rows are its bank's,
    other banks' token ids are never generated, and each bank has its own prompt cache."""
    singles = {name: alone(path) for name, path in banks.items()}
    text = "<bo> is <bo_1><bo_2>. <kit> and <ana_1> <ana>x<kit_2> <b<bo>o>"
    caches = {}
    for name in ("bob", "alice"):
        with shared.use(name) as assistant:
            single = singles[name].backbone
            ours = assistant.backbone.tokenizer.convert_ids_to_tokens(assistant.backbone._token_ids(text))
            assert ours == single.tokenizer.convert_ids_to_tokens(single._token_ids(text))  # ids differ, tokens do not
            assert "<kit>" not in ours if name == "alice" else "<ana_1>" not in ours
            emb = assistant.backbone.model.get_input_embeddings().weight
            ids = torch.tensor(assistant.tokens.all_ids)
            assert torch.equal(emb[ids].reshape(assistant.bank.input_rows.shape), assistant.bank.input_rows.to(emb))
            others = {i for n, a in shared.assistants.items() if n != name for i in a.tokens.all_ids} - set(
                assistant.tokens.all_ids
            )
            assert others and others <= set(assistant.never_say)
            caches[name] = assistant.backbone.prompt_cache
    assert caches["alice"] is not caches["bob"]
    assert not shared.backbone.prompt_cache.enabled  # between requests no bank's cache is in place


def test_banks_must_share_one_base_and_have_distinct_names(banks, tmp_path, tokenizer_dir):
    other = make_bank(make_base(tokenizer_dir, tmp_path / "base2", tied=True), tmp_path / "carol", concepts=ALICE)
    with pytest.raises(BankError, match="carol"):
        SharedBase.load([banks["alice"], other])
    (tmp_path / "more").mkdir()
    clash = make_bank(tmp_path / "base2", tmp_path / "more" / "alice")
    with pytest.raises(BankError, match="two banks are named 'alice'"):
        bank_folders([banks["alice"].parent, clash.parent])
    with pytest.raises(BankError, match="neither a concept bank"):
        bank_folders([tmp_path / "base2"])
    assert list(bank_folders([banks["alice"].parent])) == ["alice", "bob"]


# --------------------------------------------------------------------------------------------- server


def ask(model, question="Is <bo> in this photo?"):
    content = [{"type": "text", "text": question}, {"type": "image_url", "image_url": {"url": data_url(red_photo())}}]
    return {"messages": [{"role": "user", "content": content}], "max_tokens": 5, **({"model": model} if model else {})}


def openai_error(response, status: int) -> dict:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"} and {"message", "type", "param", "code"} <= set(body["error"])
    assert "/tmp" not in response.text  # no server path
    return body["error"]


def test_model_picks_the_bank_and_answers_as_its_own_server(shared, banks):
    client = TestClient(create_app(shared, limits=LIMITS), base_url="http://localhost")
    assert [m["id"] for m in client.get("/v1/models").json()["data"]] == ["alice", "bob"]
    singles = {
        name: TestClient(create_app(alone(path), limits=LIMITS), base_url="http://localhost")
        for name, path in banks.items()
    }
    for name in ("bob", "alice", "bob"):
        for question in ("Is <bo> in this photo?", "Describe this photo."):
            got = client.post("/v1/chat/completions", json=ask(name, question)).json()
            want = singles[name].post("/v1/chat/completions", json=ask("anything", question)).json()
            assert got["model"] == name
            assert got["choices"][0]["message"]["content"] == want["choices"][0]["message"]["content"]
            assert got["mcllava"]["locations"] == want["mcllava"]["locations"]
        streamed = client.post("/v1/chat/completions", json={**ask(name), "stream": True}).text
        assert f'"model":"{name}"' in streamed and "[DONE]" in streamed
        concepts = client.get("/v1/concepts", params={"model": name}).json()["data"]
        assert [c["id"] for c in concepts] == list(ALICE if name == "alice" else BOB)
        located = client.post("/v1/locate", params={"model": name}, json={"image": data_url(red_photo())}).json()
        assert [loc["concept"] for loc in located["locations"]] == list(ALICE if name == "alice" else BOB)
    error = openai_error(client.post("/v1/chat/completions", json=ask("carol")), 404)
    assert error["param"] == "model" and error["code"] == "model_not_found"
    assert openai_error(client.post("/v1/chat/completions", json=ask(None)), 400)["code"] == "model_required"
    openai_error(client.get("/v1/concepts", params={"model": "mcllava-alice"}), 404)


def test_a_key_limited_to_one_bank_cannot_use_another(shared):
    keys = KeyRing.parse(["admin-key-0123456789", "alice-key-0123456789=alice"])
    client = TestClient(create_app(shared, api_key=keys, limits=LIMITS))
    admin, alice = ({"Authorization": f"Bearer {k}"} for k in ("admin-key-0123456789", "alice-key-0123456789"))
    assert [m["id"] for m in client.get("/v1/models", headers=admin).json()["data"]] == ["alice", "bob"]
    assert [m["id"] for m in client.get("/v1/models", headers=alice).json()["data"]] == ["alice"]
    assert client.post("/v1/chat/completions", json=ask("alice"), headers=alice).status_code == 200
    assert client.post("/v1/chat/completions", json=ask("bob"), headers=admin).status_code == 200
    for request in (
        lambda: client.post("/v1/chat/completions", json=ask("bob"), headers=alice),
        lambda: client.post("/v1/chat/completions", json={**ask("bob"), "stream": True}, headers=alice),
        lambda: client.get("/v1/concepts", params={"model": "bob"}, headers=alice),
        lambda: client.post(
            "/v1/locate", params={"model": "bob"}, json={"image": data_url(red_photo())}, headers=alice
        ),
    ):
        response = request()
        error = openai_error(response, 403)
        assert error["code"] == "model_not_allowed" and "choices" not in response.text and "Kit" not in response.text
    assert client.get("/v1/models", headers={"Authorization": "Bearer alice-key-0123456789x"}).status_code == 401
    with pytest.raises(McLlavaError, match="carol"):
        create_app(shared, api_key=KeyRing.parse(["k-0123456789=carol"]))


def test_key_specs_and_keys_file(tmp_path):
    path = tmp_path / "keys"
    path.write_text("# who may use what\nadmin-key\n\nalice-key=alice, bob  # two banks\n")
    ring = KeyRing.parse(KeyRing.read(path))
    assert ring.match([b"nope", b"alice-key"]) == (True, frozenset({"alice", "bob"}))
    assert ring.match([b"admin-key"]) == (True, None) and ring.match([b"admin"]) == (False, None)
    assert KeyRing.parse(["YWJjZA==", "a=b=c,d"]).match([b"YWJjZA=="]) == (True, None)  # base64 padding is no bank list
    assert KeyRing.parse(["a=b=c,d"]).match([b"a=b"]) == (True, frozenset({"c", "d"}))
    for bad in (["k", "k=a"], [" "], ["two words"], ["=alice"]):
        with pytest.raises(McLlavaError):
            KeyRing.parse(bad)


def test_cli_serves_a_folder_of_banks_with_keys_per_bank(banks, tmp_path, tokenizer_dir, monkeypatch):
    import uvicorn
    from typer.testing import CliRunner

    from mcllava.cli import app

    served = {}
    monkeypatch.setattr(uvicorn, "run", lambda server_app, **kw: served.update(app=server_app, **kw))
    (tmp_path / "keys").write_text("bob-key-0123456789=bob\n")
    result = CliRunner().invoke(
        app,
        [
            "serve",
            str(banks["alice"].parent),
            "--base",
            str(banks["alice"].parent.parent / "base"),
            "--api-key",
            "admin-key-0123456789",
            "--api-keys",
            str(tmp_path / "keys"),
        ],
    )
    assert result.exit_code == 0, result.output
    client = TestClient(served["app"])
    bob = {"X-API-Key": "bob-key-0123456789"}
    assert [m["id"] for m in client.get("/v1/models", headers=bob).json()["data"]] == ["bob"]
    assert client.get("/v1/concepts", params={"model": "alice"}, headers=bob).status_code == 403
    assert (
        client.get("/v1/concepts", params={"model": "alice"}, headers={"X-API-Key": "admin-key-0123456789"}).status_code
        == 200
    )
    other = make_bank(make_base(tokenizer_dir, tmp_path / "base2", tied=True), tmp_path / "carol")
    result = CliRunner().invoke(app, ["serve", str(banks["alice"]), str(other)])
    assert result.exit_code == 2 and "carol" in result.output and "Traceback" not in result.output


def test_errors_name_no_served_banks_path(shared, banks):
    server = Server(shared, LIMITS)
    message = server.scrub(f"cannot read {banks['alice']}/x and {banks['bob']}/y")
    assert str(banks["alice"]) not in message and str(banks["bob"]) not in message
    assert message.count("<server path>") == 2
