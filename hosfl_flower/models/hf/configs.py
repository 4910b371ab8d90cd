"""Named tiny Hugging Face configurations (built with ``from_config``, nothing downloaded).

Every tiny model has 3 transformer blocks, hidden size 32, a 128-token vocabulary, pad id 0, bos id 2
and no dropout, so it fits the offline word-level tokenizer of :mod:`hosfl_flower.data.text` and its
split is deterministic. Input and output embeddings are untied, except in ``tiny-smollm`` (tied, like
SmolLM; the split gives the server its own LM head when the head trains). :func:`tiny_config` can
widen the vocabulary for a real tokenizer.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from transformers import (
    BertConfig,
    DistilBertConfig,
    Gemma3TextConfig,
    GemmaConfig,
    GPT2Config,
    GPTNeoXConfig,
    LlamaConfig,
    MistralConfig,
    OPTConfig,
    Phi3Config,
    PretrainedConfig,
    Qwen2Config,
    Qwen3Config,
    RobertaConfig,
)

TINY_VOCAB_SIZE = 128
"""Vocabulary size of every tiny configuration (unless :func:`tiny_config` is given another)."""

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
    # Llama layout with tied input and output embeddings, as SmolLM.
    "tiny-smollm": lambda: LlamaConfig(**{**_LLAMA_LIKE, "tie_word_embeddings": True}),
    # Sliding-window (window 4), global, sliding-window layers; each kind has its own rotary base.
    "tiny-gemma3": lambda: Gemma3TextConfig(
        **_LLAMA_LIKE,
        head_dim=8,
        query_pre_attn_scalar=8,
        sliding_window=4,
        layer_types=["sliding_attention", "full_attention", "sliding_attention"],
    ),
    "tiny-qwen3": lambda: Qwen3Config(**_LLAMA_LIKE, head_dim=8),
    # Every layer sliding-window attention (window 4), as Phi-3-mini's configuration sets one.
    "tiny-phi3": lambda: Phi3Config(**_LLAMA_LIKE, sliding_window=4, resid_pdrop=0.0, embd_pdrop=0.0, attention_dropout=0.0),
    # Pythia: rotary embeddings on a quarter of each head, parallel attention and MLP residuals.
    "tiny-pythia": lambda: GPTNeoXConfig(
        vocab_size=TINY_VOCAB_SIZE,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        max_position_embeddings=_MAX_POSITIONS,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        use_parallel_residual=True,
        **_SPECIAL,
    ),
    "tiny-distilbert": lambda: DistilBertConfig(
        vocab_size=TINY_VOCAB_SIZE,
        dim=32,
        hidden_dim=64,
        n_layers=3,
        n_heads=4,
        max_position_embeddings=_MAX_POSITIONS,
        dropout=0.0,
        attention_dropout=0.0,
        seq_classif_dropout=0.0,
        **_SPECIAL,
    ),
}
"""Named tiny configurations by name: ``TINY_CONFIGS[name]()`` returns a fresh config."""


def tiny_config(name: str, vocab_size: int | None = None) -> PretrainedConfig:
    """A fresh copy of the named tiny configuration, with ``vocab_size`` tokens when given.

    A wider vocabulary lets a tiny model read a real tokenizer's ids (the special ids stay 0 and 2).
    """
    if name not in TINY_CONFIGS:
        raise ValueError(f"unknown tiny model {name!r}; allowed: {', '.join(sorted(TINY_CONFIGS))}")
    config = TINY_CONFIGS[name]()
    if vocab_size is not None:
        smallest = _SPECIAL["bos_token_id"] + 1
        if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < smallest:
            raise ValueError(f"vocab_size must be an integer of at least {smallest} (pad 0, bos/eos 2), got {vocab_size!r}")
        config.vocab_size = vocab_size
    return config
