"""An exported model serves exactly what the trained one computes, takes new items by text, and rejects bad input;
the HTTP service micro-batches without changing a result, keeps added items across restarts, checks ids, a token
and read timeouts, and answers every error in one shape."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import socket
import time

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient

from client.export import export_model, load_model
from client.serve import MAX_BODY_BYTES, TOKEN_ENV, ItemJournal, main, make_app
from common.config import PollenConfig
from common.data.split import leave_one_out
from common.data.synthetic import SyntheticConfig, generate
from common.model.encoder import TextEncoder
from common.model.recommender import Recommender
from common.train import Platform, Trainer

NEW_TEXT = "Lightweight Waterproof Hiking Boots for trail camping"


@pytest.fixture(scope="module")
def split():
    return leave_one_out(generate(SyntheticConfig())[0])


def _trained(split, config: PollenConfig) -> Platform:
    """One epoch of training, so no weight is at its initial value (theta, IDs, head and adapter all moved)."""
    torch.manual_seed(0)
    encoder = TextEncoder(config.model) if config.model.text else None
    platform = Platform(split, Recommender(split, config, encoder))
    Trainer([platform], encoder, config).epoch()
    return platform


@pytest.fixture(scope="module")
def text_model(tiny_bert, split, tmp_path_factory):
    config = PollenConfig().replace(**{"base-model": tiny_bert, "lora-layers": 1})
    platform = _trained(split, config)
    folder = export_model(tmp_path_factory.mktemp("export") / "text-model", platform, config, {"ndcg@10": 0.1})
    return platform, folder


@pytest.fixture(scope="module")
def id_model(split, tmp_path_factory):
    config = PollenConfig().replace(text=False)
    platform = _trained(split, config)
    return platform, export_model(tmp_path_factory.mktemp("export") / "id-model", platform, config)


@pytest.fixture(scope="module")
def cosine_model(split, tmp_path_factory):
    """Cosine / temperature logits: the served ranking must normalise the item vectors too."""
    config = PollenConfig().replace(text=False, temperature=0.1)
    platform = _trained(split, config)
    return platform, export_model(tmp_path_factory.mktemp("export") / "cosine-model", platform, config)


@pytest.fixture(scope="module")
def prior_model(tiny_bert, split, tmp_path_factory):
    """The text prior widens item vectors and user states: served scores and new items must include it."""
    config = PollenConfig().replace(**{"base-model": tiny_bert, "text-prior": True})
    platform = _trained(split, config)
    return platform, export_model(tmp_path_factory.mktemp("export") / "prior-model", platform, config)


@pytest.fixture(scope="module")
def popularity_model(tiny_bert, split, tmp_path_factory):
    """The popularity term (the DP recipe's) adds a column to the prior's item vectors; an added item has none."""
    config = PollenConfig().replace(**{"base-model": tiny_bert, "text-prior": True, "popularity-prior": True})
    platform = _trained(split, config)
    assert platform.model.head.popularity_weight.item() != 0
    return platform, export_model(tmp_path_factory.mktemp("export") / "popularity-model", platform, config)


@pytest.fixture()
def client(text_model):
    """A fresh ServedModel per test: add_item in one test must not leak into another."""
    return TestClient(make_app(load_model(text_model[1])))


def _history(platform: Platform, user: int = 0) -> tuple[np.ndarray, list[str]]:
    seq = platform.split.sequences[user][:-1]
    return seq, [platform.split.item_ids[i - 1] for i in seq]


# -- the folder and the scores ------------------------------------------------------------------------
def test_folder_layout(text_model, id_model):
    _, folder = text_model
    assert {p.name for p in folder.iterdir()} == {"config.json", "adapter", "head.safetensors",
                                                "item_vectors.safetensors", "items.csv", "metrics.json"}
    assert (folder / "adapter" / "adapter_model.safetensors").is_file()
    meta = json.loads((folder / "config.json").read_text())
    assert meta["format-version"] == 1 and meta["num-items"] == text_model[0].split.num_items
    assert meta["config"]["lora-layers"] == 1 and meta["base-model"]["name"]
    assert json.loads((folder / "metrics.json").read_text()) == {"ndcg@10": 0.1}
    assert not (id_model[1] / "adapter").exists()
    assert not list(folder.parent.glob(".*tmp*"))  # the atomic build left nothing behind


@pytest.mark.parametrize("which", ["text_model", "id_model", "cosine_model", "prior_model", "popularity_model"])
def test_served_scores_equal_in_process_scores(which, request):
    platform, folder = request.getfixturevalue(which)
    served = load_model(folder)
    histories = [platform.split.sequences[u][:-1] for u in range(8)]
    assert torch.allclose(served.scores(histories), platform.model.score(histories), atol=1e-5)
    seq, ids = _history(platform)
    expected = platform.model.score([seq])[0].clone()
    expected[0] = float("-inf")
    expected[torch.tensor(seq)] = float("-inf")
    top = torch.topk(expected, 10)
    got = served.recommend(ids, k=10)
    assert [r["item"] for r in got] == [platform.split.item_ids[i - 1] for i in top.indices.tolist()]
    assert np.allclose([r["score"] for r in got], top.values.numpy(), atol=1e-5)


def test_seen_items_excluded_unless_asked(text_model):
    platform, folder = text_model
    served = load_model(folder)
    _, ids = _history(platform)
    everything = served.recommend(ids, k=served.num_items)
    assert not set(ids) & {r["item"] for r in everything}
    assert len(everything) == served.num_items - len(set(ids))
    assert len(served.recommend(ids, k=served.num_items, exclude_seen=False)) == served.num_items


def test_encoder_is_lazy_and_reproduces_the_trained_text_vectors(text_model):
    platform, folder = text_model
    served = load_model(folder)
    assert served._encoder is None  # known items need no BERT
    served.recommend(_history(platform)[1])
    assert served._encoder is None
    model, texts = platform.model, platform.split.item_texts[:5]
    expected = model.head.theta() * model.head.text_proj(model.text_table()[1:6])
    # same adapter, same head; the LoRA model caches bottom-layer token states in float16, and texts encoded in
    # other batches (other padding) can round differently there: agreement to float16 precision
    assert torch.allclose(served.text_item_vectors(texts), expected, atol=2e-3)


@pytest.mark.parametrize("which", ["text_model", "prior_model", "popularity_model"])
def test_add_item_then_recommend_and_use_it_in_a_history(which, request):
    platform, folder = request.getfixturevalue(which)
    served = load_model(folder)
    served.add_item("new-boots", NEW_TEXT)
    assert served.num_items == platform.split.num_items + 1
    assert served.items(offset=served.num_items - 1, limit=5) == [{"item": "new-boots", "text": NEW_TEXT}]
    seq, ids = _history(platform)
    assert "new-boots" in {r["item"] for r in served.recommend(ids, k=served.num_items)}
    # in process: the trained table plus the new text's theta-weighted projection (and, with the text prior, its
    # normalised text vector), scored by Recommender.score
    model = platform.model
    encoder = model.encoder
    with torch.no_grad():
        text = encoder.encode_catalogue(encoder.item_states([NEW_TEXT]))[1]
        table = torch.cat([model.item_vectors(), model.head.text_vectors(text)[None]])
    new_index = served.num_items
    expected = model.score([np.append(seq, new_index)], items=table)[0]
    got = served.recommend(ids + ["new-boots"], k=5, exclude_seen=False)
    assert np.allclose([r["score"] for r in got], torch.topk(expected[1:], 5).values.numpy(), atol=1e-4)


@pytest.mark.parametrize("call, message", [
    (lambda m: m.recommend([], k=5), "history is empty"),
    (lambda m: m.recommend(["no-such-item"]), "unknown item id 'no-such-item'"),
    (lambda m: m.recommend([m.items(0, 1)[0]["item"]], k=0), "k must be in 1.."),
    (lambda m: m.recommend([m.items(0, 1)[0]["item"]], k=m.num_items + 1), "k must be in 1.."),
    (lambda m: m.add_item(m.items(0, 1)[0]["item"], "some text"), "already exists"),
    (lambda m: m.add_item("x", "  "), "non-empty"),
    (lambda m: m.items(-1, 5), "offset and limit"),
])
def test_bad_calls_raise_clear_value_errors(text_model, call, message):
    with pytest.raises(ValueError, match=message):
        call(load_model(text_model[1]))


def test_id_only_model_serves_but_cannot_add_items(id_model):
    platform, folder = id_model
    served = load_model(folder)
    assert len(served.recommend(_history(platform)[1], k=3)) == 3
    with pytest.raises(ValueError, match="ID-only model"):
        served.add_item("new", NEW_TEXT)
    response = TestClient(make_app(served)).post("/items", json={"item": "new", "text": NEW_TEXT})
    assert response.status_code == 422 and "ID-only" in response.json()["detail"]
    assert served.num_items == platform.split.num_items


# -- HTTP ---------------------------------------------------------------------------------------------
def test_http_health_items_and_openapi(client, text_model):
    health = client.get("/health")
    assert health.status_code == 200
    body = health.json()
    assert body.pop("scoring").keys() == {"passes", "requests", "seconds"}
    assert body == {"status": "ok", "num_items": text_model[0].split.num_items, "text": True}
    page = client.get("/items", params={"offset": 2, "limit": 3}).json()
    assert page["total"] == text_model[0].split.num_items and len(page["items"]) == 3
    assert page["items"][0]["item"] == text_model[0].split.item_ids[2]
    schema = client.get("/openapi.json").json()
    assert {"/health", "/recommend", "/items"} <= set(schema["paths"])
    assert {"get", "post"} <= set(schema["paths"]["/items"])
    assert "RecommendRequest" in schema["components"]["schemas"]


def test_http_recommend_and_add_item(client, text_model):
    platform, _ = text_model
    _, ids = _history(platform)
    response = client.post("/recommend", json={"history": ids, "k": 4})
    assert response.status_code == 200
    rows = response.json()["items"]
    assert len(rows) == 4 and set(rows[0]) == {"item", "text", "score"}
    assert client.post("/items", json={"item": "new-boots", "text": NEW_TEXT}).status_code == 201
    response = client.post("/recommend", json={"history": ids + ["new-boots"], "k": 4})
    assert response.status_code == 200 and len(response.json()["items"]) == 4


def _known(platform) -> str:
    return platform.split.item_ids[0]


BAD_REQUESTS = [
    # (name, method, path, request kwargs (callable of a known item id), status, words in the message)
    ("unknown item", "post", "/recommend", lambda i: {"json": {"history": [i, "nope"]}}, 404, "'nope'"),
    ("empty history", "post", "/recommend", lambda i: {"json": {"history": []}}, 422, "at least 1"),
    ("missing history", "post", "/recommend", lambda i: {"json": {"k": 3}}, 422, "Field required"),
    ("k zero", "post", "/recommend", lambda i: {"json": {"history": [i], "k": 0}}, 422, "greater than or equal"),
    ("k too large", "post", "/recommend", lambda i: {"json": {"history": [i], "k": 10**9}}, 422, "k must be in"),
    ("k not a number", "post", "/recommend", lambda i: {"json": {"history": [i], "k": "ten"}}, 422, "integer"),
    ("history not strings", "post", "/recommend", lambda i: {"json": {"history": [1, 2]}}, 422, "string"),
    ("malformed JSON", "post", "/recommend",
     lambda i: {"content": b'{"history": [', "headers": {"content-type": "application/json"}}, 400, "malformed"),
    ("body not an object", "post", "/recommend", lambda i: {"json": [i]}, 422, "object"),
    ("oversized body", "post", "/recommend",
     lambda i: {"json": {"history": [i] * (MAX_BODY_BYTES // len(i) + 1)}}, 413, "64 KiB"),
    ("oversized chunked body", "post", "/recommend",  # no Content-Length: counted while streaming
     lambda i: {"content": iter([b'{"history": ["' + b"x" * MAX_BODY_BYTES, b'"]}']),
                "headers": {"content-type": "application/json"}}, 413, "64 KiB"),
    ("oversized item text", "post", "/items", lambda i: {"json": {"item": "big", "text": "x" * MAX_BODY_BYTES}},
     413, "64 KiB"),
    ("duplicate item", "post", "/items", lambda i: {"json": {"item": i, "text": "again"}}, 409, "already exists"),
    ("empty item text", "post", "/items", lambda i: {"json": {"item": "n", "text": ""}}, 422, "at least 1"),
    ("blank item text", "post", "/items", lambda i: {"json": {"item": "n", "text": "   "}}, 422, "non-empty"),
    ("negative offset", "get", "/items", lambda i: {"params": {"offset": -1}}, 422, "greater than or equal"),
    ("page too large", "get", "/items", lambda i: {"params": {"limit": 10**6}}, 422, "less than or equal"),
    ("offset not a number", "get", "/items", lambda i: {"params": {"offset": "a"}}, 422, "integer"),
]


@pytest.mark.parametrize("name, method, path, kwargs, status, words", BAD_REQUESTS, ids=[b[0] for b in BAD_REQUESTS])
def test_http_bad_requests_get_a_4xx_with_a_message(client, text_model, name, method, path, kwargs, status, words):
    response = getattr(client, method)(path, **kwargs(_known(text_model[0])))
    assert response.status_code == status, response.text
    _assert_error_shape(response, status)
    assert words in response.json()["detail"]


def _assert_error_shape(response, status: int) -> None:
    """The one error shape: {"status", "error", "detail"}, detail a single line, JSON content type."""
    body = response.json()
    assert response.headers["content-type"].startswith("application/json")
    assert set(body) == {"status", "error", "detail"} and body["status"] == status, body
    assert isinstance(body["detail"], str) and body["detail"] and "\n" not in body["detail"]
    assert isinstance(body["error"], str) and body["error"]


@pytest.mark.parametrize("method, path, status", [("get", "/nowhere", 404), ("delete", "/items", 405),
                                                  ("get", "/recommend", 405)])
def test_errors_outside_our_routes_have_the_same_shape(client, method, path, status):
    _assert_error_shape(getattr(client, method)(path), status)


def test_cli_recommend_prints_json_lines_and_rejects_unknown_items(text_model, capsys):
    platform, folder = text_model
    _, ids = _history(platform)
    assert main(["recommend", "--model", str(folder), "--history", ",".join(ids), "--k", "3"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["item"] for r in rows] == [r["item"] for r in load_model(folder).recommend(ids, k=3)]
    assert main(["recommend", "--model", str(folder), "--history", ",".join(ids), "--k", "3", "--table"]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].split()[:3] == ["rank", "item", "score"] and table[1].split()[1] == rows[0]["item"]
    assert main(["recommend", "--model", str(folder), "--history", "nope", "--table"]) == 2
    assert "unknown item id 'nope'" in capsys.readouterr().err


# -- micro-batching -----------------------------------------------------------------------------------
def test_micro_batched_results_equal_single_scoring(text_model):
    """recommend_many over mixed requests (lengths, k, exclude_seen, a bad one) = each scored alone."""
    platform, folder = text_model
    served = load_model(folder)
    requests = [(_history(platform, u)[1][-(u % 9 + 1):], 3 + u % 8, u % 3 != 0) for u in range(24)]
    requests.insert(5, (["no-such-item"], 5, True))
    batched = served.recommend_many(requests)
    assert isinstance(batched[5], ValueError) and "no-such-item" in str(batched[5])
    for (history, k, exclude), got in zip(requests, batched):
        if history == ["no-such-item"]:
            continue
        alone = served.recommend(history, k, exclude)
        assert [r["item"] for r in got] == [r["item"] for r in alone]
        assert np.allclose([r["score"] for r in got], [r["score"] for r in alone], atol=1e-5)


def test_concurrent_http_requests_are_batched_and_identical_to_in_process(text_model):
    import httpx

    platform, folder = text_model
    served = load_model(folder)
    app = make_app(served, batch_wait=0.005)
    histories = [_history(platform, u)[1] for u in range(32)]

    async def all_at_once() -> list:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://pollen") as http:
            return await asyncio.gather(*(http.post("/recommend", json={"history": h, "k": 10}) for h in histories))

    responses = asyncio.run(all_at_once())
    assert all(r.status_code == 200 for r in responses)
    for history, response in zip(histories, responses):
        assert [r["item"] for r in response.json()["items"]] == [r["item"] for r in served.recommend(history, 10)]
    batcher = app.state.batcher
    assert batcher.scored == len(histories) and batcher.passes < len(histories)  # some passes held several
    batcher.close()


# -- added items are kept ------------------------------------------------------------------------------
@pytest.fixture()
def model_copy(text_model, tmp_path):
    """A private copy of the exported folder, so journals written next to it stay in this test."""
    return shutil.copytree(text_model[1], tmp_path / "model")


def test_added_items_are_journalled_and_replayed_exactly(text_model, model_copy):
    platform, _ = text_model
    journal_path = ItemJournal.default_path(model_copy)
    assert journal_path == model_copy.parent / "model.added-items.jsonl"  # beside the folder: a re-export keeps it
    served = load_model(model_copy)
    client = TestClient(make_app(served, journal=ItemJournal(journal_path, served)))
    assert client.post("/items", json={"item": "new-boots", "text": NEW_TEXT}).status_code == 201
    assert client.post("/items", json={"item": "new-tent", "text": "Two-person tent"}).status_code == 201
    assert client.post("/items", json={"item": "new-tent", "text": "again"}).status_code == 409  # not journalled
    lines = journal_path.read_text().splitlines()
    assert [json.loads(line)["item"] for line in lines] == ["new-boots", "new-tent"]
    _, ids = _history(platform)
    before = served.recommend(ids + ["new-boots"], k=served.num_items, exclude_seen=False)

    restarted = load_model(model_copy)  # a new process would do exactly this
    assert ItemJournal(journal_path, restarted).replay() == 2
    assert restarted.num_items == served.num_items
    assert restarted.items(restarted.num_items - 2, 5) == served.items(served.num_items - 2, 5)
    assert restarted.recommend(ids + ["new-boots"], k=served.num_items, exclude_seen=False) == before  # bit-exact
    assert restarted._encoder is None  # the journalled vectors were reused: no base model needed to restart


def test_journal_replay_drops_a_torn_last_line_and_refuses_a_corrupt_one(text_model, model_copy, capsys):
    served = load_model(model_copy)
    path = ItemJournal.default_path(model_copy)
    journal = ItemJournal(path, served)
    served.add_items([("a1", "first text")], commit=journal.append)
    whole = path.read_bytes()
    path.write_bytes(whole + b'{"item": "a2", "text": "crash in the mid')  # a write cut short by a crash
    restarted = load_model(model_copy)
    assert ItemJournal(path, restarted).replay(warn=print) == 1
    assert "dropped an incomplete last line" in capsys.readouterr().out
    assert path.read_bytes() == whole  # truncated back, so the next append starts on a fresh line
    assert restarted.knows("a1") and not restarted.knows("a2")

    path.write_bytes(whole + b"not json\n")
    with pytest.raises(ValueError, match=r"added-items.jsonl, line 2: not a JSON object"):
        ItemJournal(path, load_model(model_copy)).replay()


def test_journal_from_another_export_is_encoded_again(text_model, model_copy):
    served = load_model(model_copy)
    path = ItemJournal.default_path(model_copy)
    served.add_items([("new-boots", NEW_TEXT)], commit=ItemJournal(path, served).append)
    entry = json.loads(path.read_text())
    path.write_text(json.dumps({**entry, "vector": [0.0] * len(entry["vector"]), "model": "another"}) + "\n")
    restarted = load_model(model_copy)
    ItemJournal(path, restarted).replay(warn=lambda _: None)
    index = restarted.index_of("new-boots")
    assert torch.allclose(restarted._items[index], served._items[index], atol=1e-5)  # the text, not the stale vector


def test_a_failed_journal_write_adds_nothing(text_model, model_copy):
    served = load_model(model_copy)
    journal = ItemJournal(model_copy.parent / "missing-folder" / "j.jsonl", served)
    client = TestClient(make_app(served, journal=journal), raise_server_exceptions=False)
    response = client.post("/items", json={"item": "new-boots", "text": NEW_TEXT})
    _assert_error_shape(response, 500)
    assert not served.knows("new-boots")


# -- ids and the token ---------------------------------------------------------------------------------
@pytest.mark.parametrize("item, words", [
    ("bad\x00id", "non-printable"), ("\x1b[31mred", "non-printable"), ("two\nlines", "non-printable"),
    ("   ", "whitespace"), (" padded", "whitespace"), ("x" * 257, "at most 256"),
])
def test_bad_item_ids_are_refused(client, item, words):
    response = client.post("/items", json={"item": item, "text": NEW_TEXT})
    assert response.status_code == 422, response.text
    _assert_error_shape(response, 422)
    assert words in response.json()["detail"]


def test_printable_unicode_ids_and_texts_are_accepted_control_characters_in_text_are_not(client):
    assert client.post("/items", json={"item": "café-Ω/42", "text": "Crème\tbrûlée\nset"}).status_code == 201
    response = client.post("/items", json={"item": "ok-id", "text": "bell \x07 text"})
    assert response.status_code == 422 and "control character" in response.json()["detail"]


def test_token_guards_mutating_routes_only(text_model):
    platform, folder = text_model
    client = TestClient(make_app(load_model(folder), token="s3cret-token"))
    item = {"item": "new-boots", "text": NEW_TEXT}
    for headers in ({}, {"Authorization": "Bearer wrong-token"}, {"Authorization": "s3cret-token"}):
        response = client.post("/items", json=item, headers=headers)
        _assert_error_shape(response, 401)
        assert response.headers["www-authenticate"] == "Bearer" and "Bearer <token>" in response.json()["detail"]
    assert client.post("/items", json=item, headers={"Authorization": "Bearer s3cret-token"}).status_code == 201
    assert client.post("/recommend", json={"history": [_known(platform)]}).status_code == 200
    assert client.get("/items").status_code == 200 and client.get("/health").status_code == 200


def test_cli_refuses_a_weak_token_and_bad_settings_in_one_line(text_model, capsys, monkeypatch):
    folder = str(text_model[1])
    monkeypatch.setenv(TOKEN_ENV, "short")
    assert main(["http", "--model", folder]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        f"error: the token (--token or {TOKEN_ENV}) must be at least 8 visible ASCII characters, no spaces"]
    monkeypatch.delenv(TOKEN_ENV)
    assert main(["http", "--model", folder, "--read-timeout", "0"]) == 2
    assert "--read-timeout must be > 0" in capsys.readouterr().err


# -- loading checks ------------------------------------------------------------------------------------
def _corrupt_head(folder):
    from safetensors.torch import load_file, save_file

    tensors = load_file(folder / "head.safetensors")
    key = sorted(tensors)[0]
    tensors[key][0] = float("nan")
    save_file(tensors, folder / "head.safetensors")


def _resize_items(folder):
    from safetensors.torch import load_file, save_file

    save_file({"items": load_file(folder / "item_vectors.safetensors")["items"][:-1].contiguous()},
              folder / "item_vectors.safetensors")


def _extra_key(folder):
    from safetensors.torch import load_file, save_file

    save_file({**load_file(folder / "head.safetensors"), "surprise": torch.zeros(2)}, folder / "head.safetensors")


def _int_head(folder):
    from safetensors.torch import load_file, save_file

    head = load_file(folder / "head.safetensors")
    key = sorted(head)[0]
    save_file({**head, key: head[key].to(torch.int64)}, folder / "head.safetensors")


@pytest.mark.parametrize("damage, file, words", [
    (_int_head, "head.safetensors", "expected floating point"),
    (_corrupt_head, "head.safetensors", "NaN or infinite"),
    (_resize_items, "item_vectors.safetensors", "items: shape"),
    (_extra_key, "head.safetensors", "unexpected (e.g. ['surprise'])"),
    (lambda f: (f / "head.safetensors").write_bytes(b"\x10\x00\x00\x00garbage"), "head.safetensors",
     "not a readable safetensors"),
    (lambda f: (f / "head.safetensors").unlink(), "head.safetensors", "not found"),
    (lambda f: (f / "config.json").write_text("{not json"), "config.json", "not valid JSON"),
    (lambda f: (f / "config.json").write_text(json.dumps({**json.loads((f / "config.json").read_text()),
                                                          "num-items": -3})), "config.json", "num-items"),
    (lambda f: (f / "items.csv").write_text("id,name\n1,a\n"), "items.csv", "header must be"),
])
def test_damaged_models_are_refused_naming_the_file(text_model, model_copy, capsys, damage, file, words):
    damage(model_copy)
    with pytest.raises((ValueError, FileNotFoundError)) as error:
        load_model(model_copy)
    assert str(model_copy / file) in str(error.value) and words in str(error.value)
    assert main(["recommend", "--model", str(model_copy), "--history", "x"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(model_copy / file) in err[0]


def test_a_prior_model_exported_before_whitening_still_loads_unwhitened(prior_model, tmp_path):
    """A text-prior model exported before the prior's whitening existed has no ``prior_mean`` / ``prior_whiten``:
    it loads with zero and identity, which is how it compared text vectors, and serves as before."""
    import shutil

    from safetensors.torch import load_file, save_file

    platform, folder = prior_model
    old = tmp_path / "old"
    shutil.copytree(folder, old)
    head = load_file(old / "head.safetensors")
    save_file({k: v for k, v in head.items() if k not in ("prior_mean", "prior_whiten")}, old / "head.safetensors")
    served = load_model(old)
    assert torch.equal(served.head.prior_whiten, torch.eye(len(served.head.prior_whiten)))
    assert not served.head.prior_mean.any()
    _, ids = _history(platform)
    assert served.recommend(ids, k=10) == load_model(folder).recommend(ids, k=10)


def test_a_nan_adapter_is_refused_when_the_encoder_loads(text_model, model_copy):
    from safetensors.torch import load_file, save_file

    path = model_copy / "adapter" / "adapter_model.safetensors"
    save_file({k: torch.full_like(v, float("nan")) for k, v in load_file(path).items()}, path)
    served = load_model(model_copy)  # known items need no adapter
    with pytest.raises(ValueError, match="adapter_model.safetensors: .* NaN or infinite"):
        served.add_item("new-boots", NEW_TEXT)


# -- the live service: restart, timeouts, raw HTTP errors ----------------------------------------------
def _raw(port: int, data: bytes, wait: float = 5.0) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=wait) as sock:
        sock.sendall(data)
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
        return b"".join(chunks)


def _json_of(raw: bytes) -> tuple[int, dict]:
    head, _, body = raw.partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(body)


@pytest.mark.integration
def test_live_service_keeps_items_across_a_restart_times_out_half_sent_requests(text_model, model_copy):
    from simulations.serving import Service

    token = "live-test-token"
    args = ("--read-timeout", "1", "--keep-alive", "1")
    os.environ[TOKEN_ENV] = token
    try:
        with Service(model_copy, extra_args=args) as service:
            item = json.dumps({"item": "new-boots", "text": NEW_TEXT}).encode()
            request = (b"POST /items HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                       b"Authorization: Bearer %s\r\nConnection: close\r\nContent-Length: %d\r\n\r\n%s")
            assert _json_of(_raw(service.port, request % (token.encode(), len(item), item)))[0] == 201
            status, body = _json_of(_raw(service.port, request % (b"nope-nope", len(item), item)))
            assert status == 401 and body["status"] == 401

            # half-sent requests: headers cut short, a body cut short, nothing at all; each gets 408 and closed
            started = time.monotonic()
            for partial in (b"POST /recommend HTTP/1.1\r\nHost: x\r\nContent-Le",
                            b"POST /recommend HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{\"hist",
                            b""):
                status, body = _json_of(_raw(service.port, partial))
                assert status == 408 and set(body) == {"status", "error", "detail"} and "within 1 s" in body["detail"]
            assert time.monotonic() - started < 15
            status, body = _json_of(_raw(service.port, b"NOT HTTP AT ALL\r\n\r\n"))
            assert status == 400 and set(body) == {"status", "error", "detail"}
            # an idle keep-alive connection is closed too (uvicorn's keep-alive timeout)
            get = b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n"
            with socket.create_connection(("127.0.0.1", service.port), timeout=10) as sock:
                sock.sendall(get)
                time.sleep(2.5)
                data = b""
                while chunk := sock.recv(65536):
                    data += chunk
                assert data.startswith(b"HTTP/1.1 200")  # answered, then closed when idle (recv returned b"")

        with Service(model_copy, extra_args=args) as restarted:  # a new process: the journal is replayed
            get = b"GET /items?offset=%d&limit=5 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
            total = restarted.health()["num_items"]
            status, page = _json_of(_raw(restarted.port, get % (total - 1)))
            assert status == 200 and page["items"] == [{"item": "new-boots", "text": NEW_TEXT}]
    finally:
        os.environ.pop(TOKEN_ENV, None)
