"""A trained platform model as a self-contained folder, and the serving-side model that loads it.

The folder holds everything a recommendation needs without the training code or the data loaders:

    config.json             flat PollenConfig, base-model reference, item count, text width, format version
    adapter/                PEFT LoRA folder (absent when there is no adapter: ID-only model or lora-layers 0)
    head.safetensors        the private RecommendationHead's state dict
    item_vectors.safetensors  the fused item table [N + 1, d] (row 0 = padding), so known items need no BERT
    items.csv               index, item id, text of items 1..N
    metrics.json            whatever metrics the caller passes (validation/test scores, rounds, ...)

The base model itself is referenced, not copied: it is the public pretrained model every partner already has.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from safetensors.torch import save

from common.checks import check_tensors, load_tensors, shapes
from common.config import PollenConfig
from common.errors import FileProblem, one_line
from common.files import replace_dir, write_atomic, write_json
from common.model.head import RecommendationHead
from common.model.recommender import score_histories

if TYPE_CHECKING:  # the training side only; serving never imports it
    from common.model.encoder import TextEncoder
    from common.train import Platform

FORMAT_VERSION = 1
ITEM_COLUMNS = ("index", "item", "text")


class UnknownItemError(ValueError):
    """An item id the model does not know (a ValueError so callers need to catch one kind of bad input)."""


class DuplicateItemError(ValueError):
    """add_item with an id the catalogue already has."""


# -- export ------------------------------------------------------------------------------------------
def export_model(folder: str | Path, platform: Platform, config: PollenConfig,
                 metrics: dict | None = None) -> Path:
    """Write ``platform``'s model to ``folder`` atomically: readers see the old folder or the new one, whole."""
    model, split = platform.model, platform.split
    model.refresh_text_table()  # the per-epoch table may predate the last adapter step
    encoder = model.encoder
    items = model.item_vectors().detach().cpu()
    head = {k: v.cpu() for k, v in model.private_state().items()}

    def fill(tmp: Path) -> None:
        write_json(tmp / "config.json", _describe(config, encoder, split.num_items))
        if encoder is not None and encoder.top_layers:
            encoder.save_adapter(tmp / "adapter")
        _write_tensors(tmp / "head.safetensors", head)
        _write_tensors(tmp / "item_vectors.safetensors", {"items": items})
        write_atomic(tmp / "items.csv", _items_csv(split.item_ids, split.item_texts))
        write_json(tmp / "metrics.json", metrics or {})

    return replace_dir(folder, fill)


def _describe(config: PollenConfig, encoder: TextEncoder | None, num_items: int) -> dict[str, Any]:
    """config.json: enough to rebuild the head, and to find the base model again for new item texts."""
    from common.model.encoder import resolve_model_path

    base = resolve_model_path(config.model.base_model) if encoder is not None else None
    return {"format-version": FORMAT_VERSION,
            "num-items": num_items,
            "text-dim": encoder.hidden_size if encoder is not None else None,
            "base-model": {"path": str(base), "name": encoder.model_name} if encoder is not None else None,
            "config": config.to_flat()}


def _write_tensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    write_atomic(path, save({k: v.detach().contiguous() for k, v in tensors.items()}))


def _items_csv(item_ids: list[str], texts: list[str]) -> str:
    buffer = io.StringIO(newline="")
    writer = csv.writer(buffer)
    writer.writerow(ITEM_COLUMNS)
    writer.writerows((i, item, text) for i, (item, text) in enumerate(zip(item_ids, texts), start=1))
    return buffer.getvalue()


# -- load --------------------------------------------------------------------------------------------
def load_model(folder: str | Path) -> ServedModel:
    """Rebuild a folder written by ``export_model``; the base model is loaded only when a new text arrives.
    Every file is checked (readable, expected keys and shapes, finite values); errors name the file."""
    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise FileProblem(folder, "not an exported Pollen model (no config.json)")
    try:
        meta = json.loads((folder / "config.json").read_text(encoding="utf-8"))
        version = meta.get("format-version")
    except (OSError, ValueError, AttributeError) as error:
        raise FileProblem(folder / "config.json", f"not a readable model description ({one_line(error)})") from None
    if version != FORMAT_VERSION:
        raise FileProblem(folder / "config.json", f"model format {version!r}, this code reads {FORMAT_VERSION}")
    if not isinstance(meta.get("num-items"), int) or meta["num-items"] < 1 or not isinstance(meta.get("config"), dict):
        raise FileProblem(folder / "config.json", "expected 'num-items' (an integer >= 1) and 'config' (a table)")
    config = PollenConfig.from_flat(meta["config"])
    head = RecommendationHead(meta["num-items"], meta["text-dim"], config.model, config.data)
    head_file = folder / "head.safetensors"
    head_state = load_tensors(head_file, "recommendation head")
    check_tensors(head_state, head_file, shapes(head.state_dict()), "recommendation head")
    head.load_state_dict(head_state)
    head.eval()
    vectors_file = folder / "item_vectors.safetensors"
    vectors = load_tensors(vectors_file, "item table")
    check_tensors(vectors, vectors_file, {"items": (meta["num-items"] + 1, config.model.hidden_size)}, "item table")
    items = vectors["items"]
    item_ids, texts = _read_items(folder / "items.csv")
    if not len(item_ids) == meta["num-items"] == len(items) - 1:
        raise FileProblem(folder, f"{len(item_ids)} items in items.csv, {len(items) - 1} item vectors, "
                                  f"{meta['num-items']} in config.json")
    return ServedModel(folder, meta, config, head, items, item_ids, texts)


def _read_items(path: Path) -> tuple[list[str], list[str]]:
    try:
        with path.open(newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
        ok = [int(r["index"]) for r in rows] == list(range(1, len(rows) + 1)) and all(
            isinstance(r["item"], str) and isinstance(r["text"], str) for r in rows)
    except (OSError, UnicodeDecodeError, csv.Error, KeyError, TypeError, ValueError) as error:
        raise FileProblem(path, f"not a readable item list ({one_line(error)}); expected the columns "
                                f"{', '.join(ITEM_COLUMNS)}") from None
    if not ok:
        raise FileProblem(path, "item indices must be 1..N in order, every row with an item and a text")
    return [r["item"] for r in rows], [r["text"] for r in rows]


# -- serving -----------------------------------------------------------------------------------------
class ServedModel:
    """Recommends from item-id histories with the exported head and item table; new items by text, no retraining.

    Thread-safe: the HTTP server calls it from a thread pool, and add_item grows the table other calls read.
    """

    def __init__(self, folder: Path, meta: dict[str, Any], config: PollenConfig, head: RecommendationHead,
                 items: torch.Tensor, item_ids: list[str], texts: list[str]):
        self.folder = folder
        self.meta = meta
        self.config = config
        self.head = head
        self._items = items
        self._ids = list(item_ids)
        self._texts = list(texts)
        self._index = {item: i for i, item in enumerate(self._ids, start=1)}
        if len(self._index) != len(self._ids):
            raise ValueError(f"{folder}: duplicate item ids in items.csv")
        self._encoder: TextEncoder | None = None
        self._lock = threading.RLock()

    @property
    def num_items(self) -> int:
        return len(self._ids)

    @property
    def has_text(self) -> bool:
        """Whether new items can be added: only a model with a text projection can place an unseen text."""
        return self.head.text_proj is not None

    def index_of(self, item: str) -> int:
        try:
            return self._index[item]
        except KeyError:
            raise UnknownItemError(f"unknown item id {item!r}") from None

    # -- recommending --------------------------------------------------------------------------------
    @torch.inference_mode()
    def recommend(self, history: list[str], k: int = 10, exclude_seen: bool = True) -> list[dict[str, Any]]:
        """Top-k items after ``history`` (oldest first) as {item, text, score}, best first.

        With exclude_seen, fewer than k come back when the history covers nearly the whole catalogue.
        """
        with self._lock:
            if not history:
                raise ValueError("history is empty: give at least one item id")
            if not 1 <= k <= self.num_items:
                raise ValueError(f"k must be in 1..{self.num_items} (the catalogue size), got {k}")
            seen = np.array([self.index_of(item) for item in history], dtype=np.int64)
            scores = self.scores([seen])[0]
            scores[0] = float("-inf")  # the padding item is never a candidate
            if exclude_seen:
                scores[torch.from_numpy(seen)] = float("-inf")
            top = torch.topk(scores, min(k, int(torch.isfinite(scores).sum())))
            return [{"item": self._ids[i - 1], "text": self._texts[i - 1], "score": float(s)}
                    for s, i in zip(top.values.tolist(), top.indices.tolist())]

    @torch.inference_mode()
    def scores(self, histories: list[np.ndarray]) -> torch.Tensor:
        """Scores [B, num_items + 1] of every item after each index history: what Recommender.score computes."""
        return score_histories(self.head, self._items, histories, self.config.data.max_len)

    def items(self, offset: int = 0, limit: int = 50) -> list[dict[str, str]]:
        """One page of the catalogue in index order (added items last)."""
        if offset < 0 or limit < 0:
            raise ValueError(f"offset and limit must be >= 0, got offset={offset}, limit={limit}")
        with self._lock:
            return [{"item": item, "text": text}
                    for item, text in zip(self._ids[offset:offset + limit], self._texts[offset:offset + limit])]

    # -- new items -----------------------------------------------------------------------------------
    def add_item(self, item_id: str, text: str) -> None:
        """Encode ``text`` with the base model + adapter and append it; it has no ID embedding (never trained)."""
        if not item_id or not text.strip():
            raise ValueError("a new item needs a non-empty id and text")
        with self._lock:
            if item_id in self._index:
                raise DuplicateItemError(f"item id {item_id!r} already exists")
            vector = self.text_item_vectors([text])
            self._items = torch.cat([self._items, vector])
            self._ids.append(item_id)
            self._texts.append(text)
            self._index[item_id] = len(self._ids)

    @torch.inference_mode()
    def text_item_vectors(self, texts: list[str]) -> torch.Tensor:
        """Fused vectors [n, d] of new texts: theta x text projection (the ID part is zero for an unseen item)."""
        if not self.has_text:
            raise ValueError("this is an ID-only model (text=false): it has no text encoder, so new items "
                             "cannot be added without retraining")
        encoder = self.text_encoder()
        text = encoder.encode_catalogue(encoder.item_states(texts))[1:]
        return self.head.text_vectors(text)

    def text_encoder(self) -> TextEncoder:
        """The base model with the exported adapter, loaded on first use (seconds and hundreds of MB)."""
        with self._lock:
            if self._encoder is None:
                self._encoder = self._load_encoder()
            return self._encoder

    def _load_encoder(self) -> TextEncoder:
        from common.model.encoder import TextEncoder

        base = self.meta["base-model"]["path"]
        if not (Path(base) / "config.json").is_file():  # exported elsewhere: fall back to the configured name
            base = self.config.model.base_model
        encoder = TextEncoder(dataclasses.replace(self.config.model, base_model=base))
        adapter = self.folder / "adapter" / "adapter_model.safetensors"
        if encoder.top_layers:
            if not adapter.is_file():
                raise FileProblem(self.folder, "the config has LoRA layers but no adapter/ folder")
            tensors = load_tensors(adapter, "adapter")
            check_tensors(tensors, adapter, shapes(encoder.adapter_state()), "adapter")
            encoder.load_adapter_state(tensors)
        return encoder
