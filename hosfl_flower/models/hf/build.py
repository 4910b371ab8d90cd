"""Loading Hugging Face models (named tiny configurations or ``from_pretrained``), LoRA, and the model cache.

Per-process cache: :func:`library_model` keeps one *template* per ``(name_or_path, task, num_classes,
seed, lora)`` (an ``lru_cache`` of the last few) and hands out fresh deep copies of it in which every
frozen parameter is shared with the template instead of copied. With LoRA the frozen base weights
are therefore loaded once per process and never copied per model or per message; only the trainable
tensors (LoRA adapters, the classification head) are fresh. Frozen tensors must never be modified in
place. A local directory is cached by its path: call :func:`clear_model_cache` after changing it.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache

import torch
from peft import LoraConfig, inject_adapter_in_model
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, PreTrainedModel

from ...zo.directions import trainable_parameters
from .configs import TINY_CONFIGS, tiny_config
from .split import TASKS, HFSplitModel, split_library_model

DEFAULT_LORA_TARGETS: dict[str, tuple[str, ...]] = {
    "gpt2": ("c_attn",),
    "opt": ("q_proj", "v_proj"),
    "llama": ("q_proj", "v_proj"),
    "qwen2": ("q_proj", "v_proj"),
    "mistral": ("q_proj", "v_proj"),
    "gemma": ("q_proj", "v_proj"),
    "bert": ("query", "value"),
    "roberta": ("query", "value"),
}
"""LoRA target module names per ``model_type`` when :class:`LoraSettings` names none."""

CLASSIFIER_HEADS = ("score", "classifier")
"""Task-model attributes holding a new classification head (trainable even with LoRA, as in PEFT)."""


@dataclass(frozen=True)
class LoraSettings:
    """LoRA adapters (``peft``, dropout 0) on both segments; all base weights are frozen.

    ``targets`` are module names (``q_proj``, ``c_attn``, ...); empty means the family's default
    (:data:`DEFAULT_LORA_TARGETS`).
    """

    rank: int = 8
    alpha: float = 16.0
    targets: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "targets", tuple(self.targets))
        if self.rank < 1:
            raise ValueError(f"LoRA rank must be at least 1, got {self.rank}")
        if self.alpha <= 0:
            raise ValueError(f"LoRA alpha must be positive, got {self.alpha}")


def apply_lora(model: PreTrainedModel, lora: LoraSettings, task: str) -> PreTrainedModel:
    """Inject LoRA adapters in place and freeze every base weight (a classification head stays trainable)."""
    model_type = model.config.model_type
    targets = lora.targets or DEFAULT_LORA_TARGETS.get(model_type, ())
    if not targets:
        raise ValueError(f"no default LoRA targets for {model_type!r}; name them in the LoRA settings")
    config = LoraConfig(
        r=lora.rank,
        # peft annotates lora_alpha as int; it only scales by alpha / r, so a float is fine
        lora_alpha=lora.alpha,  # type: ignore[arg-type]
        lora_dropout=0.0,
        target_modules=list(targets),
        fan_in_fan_out=model_type == "gpt2",  # GPT-2 stores its projections as Conv1D (in, out)
    )
    inject_adapter_in_model(config, model)
    if task == "classification":
        for name in CLASSIFIER_HEADS:
            if isinstance(getattr(model, name, None), torch.nn.Module):
                getattr(model, name).requires_grad_(True)
    return model


def load_library_model(name_or_path: str, task: str, num_classes: int) -> PreTrainedModel:
    """The unsplit float32 task model: a named tiny configuration (``from_config``) or ``from_pretrained``."""
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; allowed: {', '.join(TASKS)}")
    if task != "classification":
        if name_or_path in TINY_CONFIGS:
            return AutoModelForCausalLM.from_config(tiny_config(name_or_path), dtype=torch.float32)
        return AutoModelForCausalLM.from_pretrained(name_or_path, dtype=torch.float32)
    if name_or_path in TINY_CONFIGS:
        config = tiny_config(name_or_path)
        config.num_labels = num_classes
        return AutoModelForSequenceClassification.from_config(config, dtype=torch.float32)
    return AutoModelForSequenceClassification.from_pretrained(name_or_path, dtype=torch.float32, num_labels=num_classes)


@lru_cache(maxsize=4)
def _template(name_or_path: str, task: str, num_classes: int, seed: int, lora: LoraSettings | None) -> PreTrainedModel:
    """The cached model every :func:`library_model` call copies (never handed out itself)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = load_library_model(name_or_path, task, num_classes)
        if lora is not None:
            apply_lora(model, lora, task)
    return model.eval()


def library_model(
    name_or_path: str,
    task: str = "classification",
    num_classes: int = 2,
    seed: int = 0,
    lora: LoraSettings | None = None,
) -> PreTrainedModel:
    """A fresh unsplit task model from the per-process cache (frozen weights shared, trainable ones copied).

    Initial weights depend on ``seed`` alone (the classification head and LoRA adapters of a
    pretrained model included). ``num_classes`` only matters for ``classification``.
    """
    key_classes = num_classes if task == "classification" else 0
    template = _template(name_or_path, task, key_classes, seed, lora)
    shared = {id(p): p for p in template.parameters() if not p.requires_grad}
    return copy.deepcopy(template, shared)


def clear_model_cache() -> None:
    """Forget every cached template (e.g. after a local checkpoint directory changed)."""
    _template.cache_clear()


def build_hf_split_model(
    name_or_path: str,
    cut_layer: int,
    task: str = "classification",
    num_classes: int = 2,
    seed: int = 0,
    lora: LoraSettings | None = None,
    verbalizer_ids: Sequence[int] | None = None,
) -> HFSplitModel:
    """A split Hugging Face model in eval mode, cheap to rebuild (see :func:`library_model`).

    ``name_or_path``: a key of :data:`TINY_CONFIGS`, a hub name or a local directory.
    ``verbalizer`` needs ``verbalizer_ids`` (one token id per class, ``num_classes`` of them).
    """
    if task == "verbalizer" and len(verbalizer_ids or ()) != num_classes:
        raise ValueError(f"a verbalizer task with {num_classes} classes needs {num_classes} verbalizer ids, got {verbalizer_ids}")
    unsplit = library_model(name_or_path, task, num_classes, seed, lora)
    model = split_library_model(unsplit, cut_layer, task, verbalizer_ids)
    if lora is not None and not trainable_parameters(model.client):
        targets = lora.targets or DEFAULT_LORA_TARGETS[model.config.model_type]
        raise ValueError(f"LoRA targets {list(targets)} match no module of the client segment (cut-layer {cut_layer})")
    return model.eval()
