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
import unicodedata
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import numpy as np
import torch
from safetensors.torch import save

from common.checks import check_tensors, load_tensors, shapes
from common.errors import FileProblem
from common.config import PollenConfig
from common.files import replace_dir, write_atomic, write_json
from common.model.head import RecommendationHead
from common.model.recommender import score_histories

if TYPE_CHECKING:  # the training side only; serving never imports it
    from common.model.encoder import TextEncoder
    from common.train import Platform

FORMAT_VERSION = 1
# the text prior's whitening, added to format 1 later: a model exported before it lacks them, and their defaults
# (zero mean, identity) are what it did: compare MiniLM's vectors as they are
UNWHITENED = ("prior_mean", "prior_whiten")
ITEM_COLUMNS = ("index", "item", "text")


class UnknownItemError(ValueError):
    """An item id the model does not know (a ValueError so callers need to catch one kind of bad input)."""


class DuplicateItemError(ValueError):
    """add_item with an id the catalogue already has."""


MAX_ID_CHARS = 256


def check_item_id(item_id: Any) -> str:
    """A new item id: 1..256 printable characters (no NUL, no terminal escapes), not blank, no outer spaces."""
    if not isinstance(item_id, str) or not item_id:
        raise ValueError("item id must be a non-empty string")
    if len(item_id) > MAX_ID_CHARS:
        raise ValueError(f"item id is {len(item_id)} characters, at most {MAX_ID_CHARS} allowed")
    if not item_id.isprintable():
        bad = next(c for c in item_id if not c.isprintable())
        raise ValueError(f"item id {item_id!r} contains the non-printable character {bad!r}")
    if item_id != item_id.strip():
        raise ValueError(f"item id {item_id!r} is blank or starts/ends with whitespace")
    return item_id


def check_item_text(item_id: str, text: Any) -> str:
    """A new item's text: not blank, no control characters other than tab and newline."""
    if not isinstance(text, str) or not text.strip():
        raise ValueError(f"item {item_id!r}: a new item needs a non-empty id and text")
    bad = next((c for c in text if unicodedata.category(c) == "Cc" and c not in "\t\n\r"), None)
    if bad is not None:
        raise ValueError(f"item {item_id!r}: text contains the control character {bad!r}")
    return text


# -- export ------------------------------------------------------------------------------------------
def export_model(folder: str | Path, platform: Platform, config: PollenConfig,
                 metrics: dict | None = None) -> Path:
    """Write ``platform``'s model to ``folder`` atomically: readers see the old folder or the new one, whole."""
    model, split = platform.model, platform.split
    encoder = model.encoder
    items = model.item_vectors().detach().cpu()
    head = {k: v.detach().cpu() for k, v in model.head.state_dict().items()}  # private and shared: the whole model
    if model.states is not None:  # new texts are cut where the catalogue's were
        config = config.replace(**{"max-tokens": model.states.max_tokens})

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

    Every file is checked before use (JSON and CSV parse, tensor keys, shapes, finite values: common/checks.py);
    a bad or missing one raises a ValueError that names the file and what is wrong. Tensors are read
    with safetensors only: nothing in an exported model can run code when loaded (no pickle, no torch.load).
    """
    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"{folder}: not an exported Pollen model (no config.json)")
    meta = _read_meta(folder / "config.json")
    try:
        config = PollenConfig.from_flat(meta["config"])
    except (ValueError, TypeError) as error:
        raise ValueError(f"{folder / 'config.json'}: bad 'config': {error}") from None
    head = RecommendationHead(meta["num-items"], meta["text-dim"], config.model, config.data)
    state = head.state_dict()
    head.load_state_dict(_read_tensors(folder / "head.safetensors", shapes(state),
                                       {k: state[k] for k in UNWHITENED if k in state}))
    head.eval()
    rows, width = meta["num-items"] + 1, head.item_width
    items = _read_tensors(folder / "item_vectors.safetensors", {"items": (rows, width)})["items"]
    item_ids, texts = _read_items(folder / "items.csv")
    if len(item_ids) != meta["num-items"]:
        raise ValueError(f"{folder / 'items.csv'}: {len(item_ids)} items, config.json says {meta['num-items']}")
    return ServedModel(folder, meta, config, head, items, item_ids, texts)


def _read_meta(path: Path) -> dict[str, Any]:
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"{path}: not valid JSON ({error})") from None
    if not isinstance(meta, dict):
        raise ValueError(f"{path}: expected a JSON object")
    if meta.get("format-version") != FORMAT_VERSION:
        raise ValueError(f"{path}: model format {meta.get('format-version')!r}, this code reads {FORMAT_VERSION}")
    num, dim = meta.get("num-items"), meta.get("text-dim")
    if type(num) is not int or num < 1:
        raise ValueError(f"{path}: 'num-items' must be a positive integer, got {num!r}")
    if dim is not None and (type(dim) is not int or dim < 1):
        raise ValueError(f"{path}: 'text-dim' must be a positive integer or null, got {dim!r}")
    if not isinstance(meta.get("config"), dict):
        raise ValueError(f"{path}: 'config' must be an object of settings")
    return meta


def _read_tensors(path: Path, expected: dict[str, tuple[int, ...]], defaults: dict[str, torch.Tensor] | None = None
                  ) -> dict[str, torch.Tensor]:
    """A safetensors file of the exported model holding exactly ``expected`` (key -> shape), floating point and
    finite; a key of ``defaults`` it lacks takes that value."""
    tensors = {**(defaults or {}), **load_tensors(path, "file of the exported model")}
    check_tensors(tensors, path, expected, "file of the exported model")
    integers = [f"{key}: {value.dtype}" for key, value in sorted(tensors.items()) if not value.is_floating_point()]
    if integers:  # load_state_dict would silently cast them
        raise FileProblem(path, f"unusable file of the exported model: {integers[0]}, expected floating point")
    return tensors


def _read_items(path: Path) -> tuple[list[str], list[str]]:
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing from the exported model")
    try:
        with path.open(newline="", encoding="utf-8") as f:
            reader = csv.reader(f)
            header = next(reader, None)
            if header is None or tuple(header) != ITEM_COLUMNS:
                raise ValueError(f"{path}: header must be {','.join(ITEM_COLUMNS)}, got {header!r}")
            rows = list(reader)
    except (UnicodeDecodeError, csv.Error) as error:
        raise ValueError(f"{path}: unreadable CSV ({error})") from None
    for line, row in enumerate(rows, start=2):
        if len(row) != 3 or row[0] != str(line - 1) or not row[1]:
            raise ValueError(f"{path}, line {line}: expected index {line - 1}, a non-empty item id and a text")
    return [r[1] for r in rows], [r[2] for r in rows]


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
        self._encoder_lock = threading.Lock()

    @property
    def num_items(self) -> int:
        return len(self._ids)

    @property
    def has_text(self) -> bool:
        """Whether new items can be added: only a model with a text projection can place an unseen text."""
        return self.head.text_proj is not None

    def knows(self, item: str) -> bool:
        return item in self._index

    def index_of(self, item: str) -> int:
        try:
            return self._index[item]
        except KeyError:
            raise UnknownItemError(f"unknown item id {item!r}") from None

    # -- recommending --------------------------------------------------------------------------------
    def recommend(self, history: list[str], k: int = 10, exclude_seen: bool = True) -> list[dict[str, Any]]:
        """Top-k items after ``history`` (oldest first) as {item, text, score}, best first.

        With exclude_seen, fewer than k come back when the history covers nearly the whole catalogue.
        The same code as ``recommend_many`` with one request, so a micro-batched server returns the same lists.
        """
        result = self.recommend_many([(history, k, exclude_seen)])[0]
        if isinstance(result, Exception):
            raise result
        return result

    @torch.inference_mode()
    def recommend_many(self, requests: list[tuple[list[str], int, bool]]) -> list[list[dict[str, Any]] | ValueError]:
        """``recommend`` for many (history, k, exclude_seen) requests in one scoring pass (micro-batching).

        A bad request gets its ValueError in its place; the others are scored together, exactly (a full scan of
        the catalogue, no approximate search). Padding is masked, so a request's scores do not depend on which
        requests share its pass, up to float rounding (~1e-6: matrix products of other shapes add in other
        orders); the benchmark checks that the served top-k lists equal the in-process ones.
        """
        results: list[Any] = [None] * len(requests)
        rows, seen_rows, ks = [], [], []
        with self._lock:  # one consistent catalogue: add_items replaces the table and only appends to the lists
            items, ids, texts, num_items = self._items, self._ids, self._texts, len(self._ids)
            for i, (history, k, exclude_seen) in enumerate(requests):
                try:
                    if not history:
                        raise ValueError("history is empty: give at least one item id")
                    if not 1 <= k <= num_items:
                        raise ValueError(f"k must be in 1..{num_items} (the catalogue size), got {k}")
                    seen = np.array([self.index_of(item) for item in history], dtype=np.int64)
                except ValueError as error:
                    results[i] = error
                    continue
                rows.append(i)
                seen_rows.append((seen, exclude_seen))
                ks.append(k)
        if not rows:
            return results
        max_len = self.config.data.max_len
        width = min(max_len, max(len(seen) for seen, _ in seen_rows))
        inputs = np.zeros((len(rows), width), dtype=np.int64)  # right-aligned, 0 = padding
        for row, (seen, _) in enumerate(seen_rows):
            tail = seen[-width:]
            inputs[row, width - len(tail):] = tail
        scores = self.head.similarity(self.head.last_states(torch.from_numpy(inputs), items), items)
        scores[:, 0] = float("-inf")  # the padding item is never a candidate
        hidden = [(row, seen) for row, (seen, exclude_seen) in enumerate(seen_rows) if exclude_seen]
        if hidden:
            scores[torch.from_numpy(np.concatenate([np.full(len(seen), row) for row, seen in hidden])),
                   torch.from_numpy(np.concatenate([seen for _, seen in hidden]))] = float("-inf")
        top = torch.topk(scores, max(ks))
        values, indices = top.values.tolist(), top.indices.tolist()
        for row, (i, k) in enumerate(zip(rows, ks)):
            results[i] = [{"item": ids[j - 1], "text": texts[j - 1], "score": s}
                          for s, j in zip(values[row][:k], indices[row][:k]) if s != float("-inf")]
        return results

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
        self.add_items([(item_id, text)])

    def add_items(self, items: list[tuple[str, str]], vectors: torch.Tensor | None = None,
                  commit: Callable[[list[tuple[str, str]], torch.Tensor], None] | None = None) -> None:
        """Append (id, text) items, encoded from their texts unless ``vectors`` [n, d] are given (a journal replay).

        ``commit(items, vectors)`` runs under the lock just before the catalogue grows (the server's journal: an
        item is served only once it is on disk); if it raises, nothing is added. All or none of ``items`` go in.
        """
        for item_id, text in items:
            check_item_id(item_id)
            check_item_text(item_id, text)
        if len({item_id for item_id, _ in items}) != len(items):
            raise DuplicateItemError("the same item id appears twice in one request")
        self._refuse_known(items)  # before the (slow) encoding
        if vectors is None:
            vectors = self.text_item_vectors([text for _, text in items])
        check_tensors({"items": vectors}, "new item vectors", {"items": (len(items), self._items.shape[1])},
                      "item vectors")
        with self._lock:
            self._refuse_known(items)  # again: another thread may have added one while this one encoded
            if commit is not None:
                commit(items, vectors)
            self._items = torch.cat([self._items, vectors.to(self._items.dtype)])
            for item_id, text in items:
                self._ids.append(item_id)
                self._texts.append(text)
                self._index[item_id] = len(self._ids)

    def _refuse_known(self, items: list[tuple[str, str]]) -> None:
        for item_id, _ in items:
            if item_id in self._index:
                raise DuplicateItemError(f"item id {item_id!r} already exists")

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
        with self._encoder_lock:  # its own lock: recommend calls go on while the base model loads
            if self._encoder is None:
                self._encoder = self._load_encoder()
            return self._encoder

    def _load_encoder(self) -> TextEncoder:
        from common.model.encoder import SHARED, TextEncoder

        base = self.meta["base-model"]["path"]
        if not (Path(base) / "config.json").is_file():  # exported elsewhere: fall back to the configured name
            base = self.config.model.base_model
        encoder = TextEncoder(dataclasses.replace(self.config.model, base_model=base), max_len=self.config.data.max_len)
        adapter = self.folder / "adapter" / "adapter_model.safetensors"
        if encoder.top_layers:
            if not adapter.is_file():
                raise FileNotFoundError(f"{self.folder}: the config has LoRA layers but no adapter/ folder")
            try:
                lora = {k: v for k, v in encoder.adapter_state().items() if not k.startswith(SHARED)}
                # the shared adaptor and sequence encoder are in head.safetensors; the encoder needs its LoRA
                encoder.load_adapter_state({**encoder.adapter_state(), **_read_tensors(adapter, shapes(lora))})
            except ValueError as error:
                raise ValueError(f"{adapter}: {error}" if str(adapter) not in str(error) else str(error)) from None
        return encoder
