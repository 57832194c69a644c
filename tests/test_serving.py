"""An exported model serves exactly what the trained one computes, takes new items by text, and rejects bad input."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient

from client.export import export_model, load_model
from client.serve import MAX_BODY_BYTES, main, make_app
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


@pytest.mark.parametrize("which", ["text_model", "id_model"])
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
    assert torch.allclose(served.text_item_vectors(texts), expected, atol=1e-4)  # same adapter, same head


def test_add_item_then_recommend_and_use_it_in_a_history(text_model):
    platform, folder = text_model
    served = load_model(folder)
    served.add_item("new-boots", NEW_TEXT)
    assert served.num_items == platform.split.num_items + 1
    assert served.items(offset=served.num_items - 1, limit=5) == [{"item": "new-boots", "text": NEW_TEXT}]
    seq, ids = _history(platform)
    assert "new-boots" in {r["item"] for r in served.recommend(ids, k=served.num_items)}
    # in process: the trained table plus the new text's theta-weighted projection, scored by Recommender.score
    model = platform.model
    encoder = model.encoder
    with torch.no_grad():
        text = encoder.encode_catalogue(encoder.item_states([NEW_TEXT]))[1]
        table = torch.cat([model.item_vectors(), (model.head.theta() * model.head.text_proj(text))[None]])
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


# -- HTTP ---------------------------------------------------------------------------------------------
def test_http_health_items_and_openapi(client, text_model):
    health = client.get("/health")
    assert health.status_code == 200
    assert health.json() == {"status": "ok", "num_items": text_model[0].split.num_items, "text": True}
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
    assert words in json.dumps(response.json()["detail"])


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
