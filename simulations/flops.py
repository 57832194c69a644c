"""FLOPs of Pollen's work, counted from the model's shapes (multiply-add = 2 FLOPs; elementwise work ignored).

One BERT layer on one text of T tokens, hidden H, feed-forward width I, LoRA rank r on m of its linear maps:

    linear    2·T·(4·H² + 2·H·I)     query, key, value, output (H×H each) and the two feed-forward maps
    attention 2·2·T²·H               Q·Kᵀ and softmax·V, summed over the heads
    LoRA      m·4·T·H·r              x·A (H×r) then ·B (r×H) for each adapted map

Training (forward + backward): layers below the lowest LoRA layer have no backward (nothing under them needs
a gradient). Above it, a frozen linear map needs only the gradient of its input (1× its forward FLOPs more);
attention products and trainable maps (LoRA, the head) need both operands' gradients (2× more). So a frozen
linear costs 2× its forward, attention, LoRA and the head 3×. The lowest LoRA layer does not need its input's
gradient: ignored, so training counts are a slight over-estimate (at most one layer's frozen-linear backward).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable


@dataclass(frozen=True)
class EncoderShape:
    hidden: int
    intermediate: int
    layers: int
    lora_layers: int
    lora_rank: int
    lora_maps: int  # adapted linear maps per LoRA layer (query, value -> 2)

    @classmethod
    def of(cls, encoder) -> "EncoderShape":
        config = encoder._bert.config
        targets = [t for t in encoder.bert.peft_config["default"].target_modules] if encoder.top_layers else []
        rank = encoder.bert.peft_config["default"].r if encoder.top_layers else 0
        return cls(config.hidden_size, config.intermediate_size, config.num_hidden_layers, encoder.top_layers,
                   rank, len(targets))


def layer_parts(tokens: int, hidden: int, intermediate: int, lora_rank: int = 0, lora_maps: int = 0
                ) -> tuple[int, int, int]:
    """Forward FLOPs (linear, attention, LoRA) of one layer on one text of ``tokens`` tokens."""
    linear = 2 * tokens * (4 * hidden * hidden + 2 * hidden * intermediate)
    attention = 2 * 2 * tokens * tokens * hidden
    lora = lora_maps * 4 * tokens * hidden * lora_rank
    return linear, attention, lora


def encoder_flops(shape: EncoderShape, lengths: Iterable[int], layers: str = "all", train: bool = False) -> int:
    """FLOPs to encode texts of these token counts through ``layers``: "all" (the whole model, with LoRA where
    it sits), "bottom" (the frozen layers only) or "top" (the LoRA layers only); ``train`` adds the backward."""
    bottom = shape.layers - shape.lora_layers
    chosen = {"all": range(shape.layers), "bottom": range(bottom), "top": range(bottom, shape.layers)}[layers]
    total = 0
    for tokens in lengths:
        for layer in chosen:
            adapted = layer >= bottom
            linear, attention, lora = layer_parts(tokens, shape.hidden, shape.intermediate,
                                                  shape.lora_rank if adapted else 0, shape.lora_maps)
            backward = train and adapted
            total += (2 * linear + 3 * (attention + lora)) if backward else (linear + attention + lora)
    return total


def head_step_flops(positions: int, batch: int, length: int, catalogue: int, text_dim: int, d: int,
                    head_layers: int, feedforward: int) -> int:
    """Forward + backward FLOPs of the private head on one batch: project the catalogue's text vectors
    ([catalogue+1, text_dim] -> d), the causal user encoder over [batch, length], and the softmax logits of
    ``positions`` non-padding positions against every item."""
    projection = 2 * (catalogue + 1) * text_dim * d
    linear = 2 * batch * length * (4 * d * d + 2 * d * feedforward)
    attention = 2 * 2 * batch * length * length * d
    logits = 2 * positions * d * catalogue
    return 3 * (projection + head_layers * (linear + attention) + logits)
