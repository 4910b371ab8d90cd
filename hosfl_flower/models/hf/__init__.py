"""Split Hugging Face transformers with optional LoRA: GPT-2, OPT, rotary decoders (Llama, SmolLM, Qwen2/3,
Mistral, Phi-3, Gemma, Gemma-3, GPT-NeoX/Pythia) and encoders (BERT, RoBERTa, DistilBERT)."""

from __future__ import annotations

from .build import (
    DEFAULT_LORA_TARGETS,
    LoraSettings,
    apply_lora,
    build_hf_split_model,
    clear_model_cache,
    library_model,
    load_library_model,
    quiet_transformers,
)
from .configs import TINY_CONFIGS, TINY_VOCAB_SIZE, tiny_config
from .split import (
    SPLIT_FAMILIES,
    TASKS,
    EncoderSplit,
    HFSplitModel,
    RotaryDecoderLayout,
    RotaryDecoderSplit,
    attention_kinds,
    last_token_index,
    split_class,
    split_library_model,
)

__all__ = [
    "DEFAULT_LORA_TARGETS",
    "EncoderSplit",
    "HFSplitModel",
    "LoraSettings",
    "RotaryDecoderLayout",
    "RotaryDecoderSplit",
    "SPLIT_FAMILIES",
    "TASKS",
    "TINY_CONFIGS",
    "TINY_VOCAB_SIZE",
    "apply_lora",
    "attention_kinds",
    "build_hf_split_model",
    "clear_model_cache",
    "last_token_index",
    "library_model",
    "load_library_model",
    "quiet_transformers",
    "split_class",
    "split_library_model",
    "tiny_config",
]
