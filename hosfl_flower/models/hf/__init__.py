"""Split Hugging Face transformers (GPT-2, OPT, Llama-layout decoders, BERT-layout encoders) with optional LoRA."""

from __future__ import annotations

from .build import (
    DEFAULT_LORA_TARGETS,
    LoraSettings,
    apply_lora,
    build_hf_split_model,
    clear_model_cache,
    library_model,
    load_library_model,
)
from .configs import TINY_CONFIGS, TINY_VOCAB_SIZE, tiny_config
from .split import SPLIT_FAMILIES, TASKS, HFSplitModel, last_token_index, split_library_model

__all__ = [
    "DEFAULT_LORA_TARGETS",
    "HFSplitModel",
    "LoraSettings",
    "SPLIT_FAMILIES",
    "TASKS",
    "TINY_CONFIGS",
    "TINY_VOCAB_SIZE",
    "apply_lora",
    "build_hf_split_model",
    "clear_model_cache",
    "last_token_index",
    "library_model",
    "load_library_model",
    "split_library_model",
    "tiny_config",
]
