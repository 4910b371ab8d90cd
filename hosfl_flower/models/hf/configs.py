"""Named tiny Hugging Face configurations (built with ``from_config``, nothing downloaded).

Every tiny model has 3 transformer blocks, hidden size 32, a 128-token vocabulary, pad id 0, bos id 2
and no dropout, so it fits the offline word-level tokenizer of :mod:`hosfl_flower.data.text` and its
split is deterministic. Input and output embeddings are untied (the split gives the server its own LM head).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from transformers import (
    BertConfig,
    GemmaConfig,
    GPT2Config,
    LlamaConfig,
    MistralConfig,
    OPTConfig,
    PretrainedConfig,
    Qwen2Config,
    RobertaConfig,
)

TINY_VOCAB_SIZE = 128
"""Vocabulary size of every tiny configuration."""

_MAX_POSITIONS = 64
_SPECIAL: dict[str, Any] = {"pad_token_id": 0, "bos_token_id": 2, "eos_token_id": 2, "tie_word_embeddings": False}
_LLAMA_LIKE: dict[str, Any] = {
    "vocab_size": TINY_VOCAB_SIZE,
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 3,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": _MAX_POSITIONS,
    **_SPECIAL,
}
_BERT_LIKE: dict[str, Any] = {
    "vocab_size": TINY_VOCAB_SIZE,
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 3,
    "num_attention_heads": 4,
    "type_vocab_size": 2,
    "hidden_dropout_prob": 0.0,
    "attention_probs_dropout_prob": 0.0,
    **_SPECIAL,
}

TINY_CONFIGS: dict[str, Callable[[], PretrainedConfig]] = {
    "tiny-gpt2": lambda: GPT2Config(
        vocab_size=TINY_VOCAB_SIZE,
        n_embd=32,
        n_layer=3,
        n_head=4,
        n_inner=64,
        n_positions=_MAX_POSITIONS,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        summary_first_dropout=0.0,
        **_SPECIAL,
    ),
    # word_embed_proj_dim != hidden_size exercises OPT's project_in / project_out.
    "tiny-opt": lambda: OPTConfig(
        vocab_size=TINY_VOCAB_SIZE,
        hidden_size=32,
        word_embed_proj_dim=16,
        ffn_dim=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        max_position_embeddings=_MAX_POSITIONS,
        dropout=0.0,
        attention_dropout=0.0,
        layerdrop=0.0,
        do_layer_norm_before=True,
        **_SPECIAL,
    ),
    "tiny-llama": lambda: LlamaConfig(**_LLAMA_LIKE),
    # Layer 0 full attention, layers 1-2 sliding-window attention (window 4).
    "tiny-qwen2": lambda: Qwen2Config(**_LLAMA_LIKE, use_sliding_window=True, sliding_window=4, max_window_layers=1),
    # Every layer sliding-window attention (window 4).
    "tiny-mistral": lambda: MistralConfig(**_LLAMA_LIKE, sliding_window=4),
    # Gemma scales its token embeddings by sqrt(hidden_size).
    "tiny-gemma": lambda: GemmaConfig(**_LLAMA_LIKE, head_dim=8),
    "tiny-bert": lambda: BertConfig(**_BERT_LIKE, max_position_embeddings=_MAX_POSITIONS),
    # RoBERTa numbers positions from pad_token_id + 1, hence the two extra position embeddings.
    "tiny-roberta": lambda: RobertaConfig(**_BERT_LIKE, max_position_embeddings=_MAX_POSITIONS + 2),
}
"""Named tiny configurations by name: ``TINY_CONFIGS[name]()`` returns a fresh config."""


def tiny_config(name: str) -> PretrainedConfig:
    """A fresh copy of the named tiny configuration."""
    if name not in TINY_CONFIGS:
        raise ValueError(f"unknown tiny model {name!r}; allowed: {', '.join(sorted(TINY_CONFIGS))}")
    return TINY_CONFIGS[name]()
