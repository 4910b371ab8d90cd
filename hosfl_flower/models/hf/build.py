"""Loading Hugging Face models (named tiny configurations or ``from_pretrained``), LoRA, and the model cache.

Per-process cache: :func:`library_model` keeps one *template* per ``(name_or_path, task, num_classes,
seed, lora, vocab_size)`` (an ``lru_cache`` of the last few) and hands out fresh deep copies of it in which every
frozen parameter is shared with the template instead of copied. With LoRA the frozen base weights
are therefore loaded once per process and never copied per model or per message; only the trainable
tensors (LoRA adapters, the classification head) are fresh. Frozen tensors must never be modified in
place. A local directory is cached by its path: call :func:`clear_model_cache` after changing it.

Loading is quiet: transformers' own load reports, warnings and progress bars are silenced for the
duration of a load, and each loaded template is logged in one line on the ``hosfl_flower`` logger
(INFO): what was loaded and which parameters were newly initialised.
"""

from __future__ import annotations

import copy
import logging
import warnings
from collections.abc import Collection, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, cast

import torch
from huggingface_hub import utils as hub_utils
from peft import LoraConfig, inject_adapter_in_model
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    PretrainedConfig,
    PreTrainedModel,
)
from transformers.utils import logging as transformers_logging

from ...zo.directions import trainable_parameters
from .configs import TINY_CONFIGS, tiny_config
from .split import TASKS, HFSplitModel, split_class, split_library_model

DEFAULT_LORA_TARGETS: dict[str, tuple[str, ...]] = {
    "gpt2": ("c_attn",),
    "opt": ("q_proj", "v_proj"),
    "llama": ("q_proj", "v_proj"),
    "qwen2": ("q_proj", "v_proj"),
    "mistral": ("q_proj", "v_proj"),
    "gemma": ("q_proj", "v_proj"),
    "gemma3_text": ("q_proj", "v_proj"),
    "qwen3": ("q_proj", "v_proj"),
    "phi3": ("qkv_proj",),
    "gpt_neox": ("query_key_value",),
    "bert": ("query", "value"),
    "roberta": ("query", "value"),
    "distilbert": ("q_lin", "v_lin"),
}
"""LoRA target module names per ``model_type`` when :class:`LoraSettings` names none."""

CLASSIFIER_HEADS = ("score", "pre_classifier", "classifier")
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


LOG = logging.getLogger("hosfl_flower")


@contextmanager
def quiet_transformers() -> Iterator[None]:
    """Silence transformers' log messages (load reports), progress bars and Python warnings for a while."""
    verbosity = transformers_logging.get_verbosity()
    progress_bars = transformers_logging.is_progress_bar_enabled()
    hub_bars_disabled = hub_utils.are_progress_bars_disabled()
    transformers_logging.set_verbosity_error()
    transformers_logging.disable_progress_bar()
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", module=r"transformers(\.|$)")
            yield
    finally:
        transformers_logging.set_verbosity(verbosity)
        if progress_bars:
            transformers_logging.enable_progress_bar()
        if hub_bars_disabled:  # transformers' switch turns the hub's bars back on too
            hub_utils.disable_progress_bars()


def copy_sharing_frozen(template: PreTrainedModel) -> PreTrainedModel:
    """A deep copy of ``template`` whose frozen parameters are the template's own (only trainable ones are copied)."""
    shared = {id(p): p for p in template.parameters() if not p.requires_grad}
    return copy.deepcopy(template, shared)


def _names(keys: Collection[str]) -> str:
    return ", ".join(sorted(keys)) or "none"


def _check_vocab_size(config: PretrainedConfig, name_or_path: str, vocab_size: int | None) -> None:
    """A vocabulary size only overrides tiny configurations; for a checkpoint it must match."""
    actual = config.get_text_config().vocab_size
    if vocab_size is not None and vocab_size != actual:
        raise ValueError(
            f"vocab_size={vocab_size} only overrides tiny configurations; {name_or_path} has a vocabulary of {actual}"
        )


def load_library_model(name_or_path: str, task: str, num_classes: int, vocab_size: int | None = None) -> PreTrainedModel:
    """The unsplit float32 task model: a named tiny configuration (``from_config``) or ``from_pretrained``.

    ``vocab_size`` sets a tiny configuration's vocabulary; a checkpoint's must equal it (or it is ``None``).
    A model type that cannot be split, or not for ``task``, is refused (in one line) before any weights
    are read. A checkpoint's classification head of another number of classes is newly initialised; any
    other tensor of another shape is refused. Logs one line on the ``hosfl_flower`` logger (what was
    loaded, what was newly initialised); transformers itself stays quiet.
    """
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; allowed: {', '.join(TASKS)}")
    auto = AutoModelForSequenceClassification if task == "classification" else AutoModelForCausalLM
    if name_or_path in TINY_CONFIGS:
        config = tiny_config(name_or_path, vocab_size)
        split_class(config.model_type).check_task(task, config.model_type)
        if task == "classification":
            config.num_labels = num_classes
        model = auto.from_config(config, dtype=torch.float32)
        LOG.info("built %s (%s) from its tiny configuration, %d tokens", name_or_path, type(model).__name__, config.vocab_size)
        return model
    with quiet_transformers():
        config = AutoConfig.from_pretrained(name_or_path)
    split_class(config.model_type).check_task(task, config.model_type)
    _check_vocab_size(config, name_or_path, vocab_size)
    options = {"num_labels": num_classes} if task == "classification" else {}
    with quiet_transformers():
        loaded = auto.from_pretrained(
            name_or_path, dtype=torch.float32, output_loading_info=True, ignore_mismatched_sizes=True, **options
        )
    model, info = cast(tuple[PreTrainedModel, dict[str, set[Any]]], loaded)
    checkpoint_shapes = {key: tuple(shape) for key, shape, _ in info["mismatched_keys"]}
    head_prefixes = tuple(f"{head}." for head in CLASSIFIER_HEADS) if task == "classification" else ()
    misfits = sorted(key for key in checkpoint_shapes if not key.startswith(head_prefixes))
    if misfits:
        shapes = ", ".join(f"{key} {checkpoint_shapes[key]}" for key in misfits)
        raise ValueError(f"{name_or_path} does not fit {type(model).__name__}: the checkpoint's {shapes} differ in shape")
    reshaped = [f"{key} (checkpoint shape {checkpoint_shapes[key]})" for key in sorted(checkpoint_shapes)]
    unused = f"; unused from the checkpoint: {_names(info['unexpected_keys'])}" if info["unexpected_keys"] else ""
    LOG.info(
        "loaded checkpoint %s (%s); newly initialised: %s%s",
        name_or_path,
        type(model).__name__,
        _names([*info["missing_keys"], *reshaped]),
        unused,
    )
    return model


@lru_cache(maxsize=4)
def _template(
    name_or_path: str, task: str, num_classes: int, seed: int, lora: LoraSettings | None, vocab_size: int | None
) -> PreTrainedModel:
    """The cached model every :func:`library_model` call copies (never handed out itself)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = load_library_model(name_or_path, task, num_classes, vocab_size)
        if lora is not None:
            apply_lora(model, lora, task)
    return model.eval()


def library_model(
    name_or_path: str,
    task: str = "classification",
    num_classes: int = 2,
    seed: int = 0,
    lora: LoraSettings | None = None,
    *,
    vocab_size: int | None = None,
) -> PreTrainedModel:
    """A fresh unsplit task model from the per-process cache (frozen weights shared, trainable ones copied).

    Initial weights depend on ``seed`` alone (the classification head and LoRA adapters of a
    pretrained model included). ``num_classes`` only matters for ``classification``. ``vocab_size``
    widens (or narrows) a tiny configuration's vocabulary; for a checkpoint it must match its own.
    """
    key_classes = num_classes if task == "classification" else 0
    tiny = name_or_path in TINY_CONFIGS
    template = _template(name_or_path, task, key_classes, seed, lora, vocab_size if tiny else None)
    if not tiny:
        _check_vocab_size(template.config, name_or_path, vocab_size)
    return copy_sharing_frozen(template)


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
    *,
    vocab_size: int | None = None,
) -> HFSplitModel:
    """A split Hugging Face model in eval mode, cheap to rebuild (see :func:`library_model`).

    ``name_or_path``: a key of :data:`TINY_CONFIGS`, a hub name or a local directory.
    ``verbalizer`` needs ``verbalizer_ids`` (one token id per class, ``num_classes`` of them).
    ``vocab_size`` sets a tiny configuration's vocabulary (a checkpoint's must match it).
    """
    if task == "verbalizer" and len(verbalizer_ids or ()) != num_classes:
        raise ValueError(f"a verbalizer task with {num_classes} classes needs {num_classes} verbalizer ids, got {verbalizer_ids}")
    unsplit = library_model(name_or_path, task, num_classes, seed, lora, vocab_size=vocab_size)
    model = split_library_model(unsplit, cut_layer, task, verbalizer_ids)
    if lora is not None and not trainable_parameters(model.client):
        targets = lora.targets or DEFAULT_LORA_TARGETS[model.config.model_type]
        raise ValueError(f"LoRA targets {list(targets)} match no module of the client segment (cut-layer {cut_layer})")
    return model.eval()
