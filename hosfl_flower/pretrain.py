"""Pretrained starting points built on this machine: central causal-LM pretraining on a generated corpus.

A named pretrained model (:data:`PRETRAINED_MODELS`, e.g. ``pretrained-tiny-llama``) is a small
transformer trained for next-token prediction on :func:`~hosfl_flower.data.text.review_corpus`
(unlabelled text in the language of the bundled ``sentiment`` task, from its own generator and
seeds), then saved with its word-level tokenizer as an ordinary Hugging Face checkpoint directory.
Federated fine-tuning loads it with ``from_pretrained`` like any local checkpoint.

The directory is cached as ``<cache dir>/<name>-<key>``, where the key hashes everything that
determines the weights (:meth:`PretrainSpec.key`). It is built once per machine: under a file lock,
into a temporary directory that is renamed into place, so parallel processes never see half a
checkpoint and only one of them trains. Pretraining runs on one torch thread with fixed seeds, so
two builds on one machine give equal tensors.
"""

from __future__ import annotations

import dataclasses
import fcntl
import hashlib
import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch

CACHE_ENV = "HOSFL_FLOWER_CACHE"
"""Environment variable naming the default cache directory of pretrained checkpoints."""

FORMAT_VERSION = 1
"""Version of the pretraining procedure and checkpoint layout: bump it when either changes."""

INFO_FILE = "pretrain.json"
"""File in each checkpoint directory recording its spec, key and cost."""


@dataclass(frozen=True)
class PretrainSpec:
    """Everything that determines a pretrained checkpoint.

    ``base`` names a tiny configuration (:data:`~hosfl_flower.models.hf.TINY_CONFIGS`) and
    ``overrides`` changes some of its fields (e.g. a wider or deeper model). The corpus is
    ``corpus_documents`` documents of :func:`~hosfl_flower.data.text.review_corpus` drawn with
    ``corpus_seed``, tokenised to ``max_length``; training is ``steps`` AdamW steps of ``batch_size``
    documents (order and initial weights from ``seed``) with a linear warm-up over ``warmup_steps``
    and a cosine decay of ``lr`` to zero.
    """

    base: str
    overrides: tuple[tuple[str, int | float | str | bool], ...] = ()
    corpus_seed: int = 0
    corpus_documents: int = 20_000
    max_length: int = 32
    steps: int = 800
    batch_size: int = 32
    lr: float = 3e-3
    warmup_steps: int = 50
    weight_decay: float = 0.01
    seed: int = 0

    def model_config(self):
        """The transformers configuration of the model before pretraining."""
        from .models.hf import tiny_config

        config = tiny_config(self.base)
        for field, value in self.overrides:
            if not hasattr(config, field):
                raise ValueError(f"{self.base} has no configuration field {field!r}")
            setattr(config, field, value)
        return config

    @property
    def num_blocks(self) -> int:
        """Transformer blocks of the model (the cut must leave at least one on each side)."""
        return int(self.model_config().num_hidden_layers)

    def key(self) -> str:
        """A hash of the spec, the resulting model config, the corpus generator and library versions."""
        import transformers

        from .data.text import CORPUS_VERSION

        described = {
            "format": FORMAT_VERSION,
            "corpus-version": CORPUS_VERSION,
            "spec": dataclasses.asdict(self),
            "config": self.model_config().to_dict(),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
        }
        text = json.dumps(described, sort_keys=True, default=str)
        return hashlib.sha256(text.encode()).hexdigest()[:16]


PRETRAINED_MODELS: dict[str, PretrainSpec] = {
    "pretrained-tiny-llama": PretrainSpec(
        "tiny-llama", overrides=(("hidden_size", 64), ("intermediate_size", 128), ("num_hidden_layers", 4))
    ),
}
"""Named pretrained models: ``pretrained-<tiny configuration>``, built on first use."""


def default_cache_dir() -> Path:
    """``$HOSFL_FLOWER_CACHE``, else ``$XDG_CACHE_HOME/hosfl-flower``, else ``~/.cache/hosfl-flower``."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    root = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(root).expanduser() / "hosfl-flower"


def resolve_cache_dir(value: str) -> Path:
    """The cache directory a ``pretrain.cache-dir`` value names (empty: :func:`default_cache_dir`), created
    if missing; a path that cannot be a writable directory raises a one-line ``ConfigError``."""
    from .config import ConfigError

    path = Path(value).expanduser() if value else default_cache_dir()
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise ConfigError("pretrain.cache-dir", value, f"cannot create directory {path} ({error.strerror})") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise ConfigError("pretrain.cache-dir", value, f"directory {path} is not writable")
    return path


def checkpoint_dir(name: str, cache_dir: Path) -> Path:
    """Where the named pretrained model's checkpoint lives (built or not)."""
    spec = PRETRAINED_MODELS[name]
    return cache_dir / f"{name}-{spec.key()}"


def corpus_examples(spec: PretrainSpec, num_documents: int, corpus_seed: int):
    """Tokenised corpus documents as :class:`~hosfl_flower.data.Examples` with causal-LM labels."""
    import datasets
    from datasets import Dataset

    from .data.text import review_corpus, sentiment_tokenizer, text_examples, tokenize_dataset

    datasets.disable_progress_bars()
    raw = Dataset.from_dict({"text": review_corpus(num_documents, corpus_seed), "label": [0] * num_documents})
    return text_examples(tokenize_dataset(raw, sentiment_tokenizer(), spec.max_length), task="causal-lm")


def heldout_examples(spec: PretrainSpec, num_documents: int = 1000):
    """Held-out documents of the pretraining corpus (a seed the training corpus never uses)."""
    return corpus_examples(spec, num_documents, corpus_seed=spec.corpus_seed + 1_000_003)


@torch.no_grad()
def causal_lm_loss(model, examples, batch_size: int = 256) -> float:
    """Mean next-token cross-entropy of a ``*ForCausalLM`` model over ``examples`` (per token)."""
    total, tokens = 0.0, 0
    model.eval()
    for batch in examples.batches(batch_size):
        out = model(**batch.inputs, labels=batch.labels)
        counted = int((batch.labels[:, 1:] != -100).sum())
        total, tokens = total + float(out.loss) * counted, tokens + counted
    return total / max(tokens, 1)


def pretrain(spec: PretrainSpec):
    """Train a fresh model of ``spec`` (one torch thread, fixed seeds); return it and its training info."""
    from transformers import AutoModelForCausalLM

    from .data import sample_batch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(spec.seed)
            model = AutoModelForCausalLM.from_config(spec.model_config(), dtype=torch.float32)
        corpus = corpus_examples(spec, spec.corpus_documents, spec.corpus_seed)
        optimizer = torch.optim.AdamW(model.parameters(), lr=spec.lr, weight_decay=spec.weight_decay, foreach=False)

        def factor(step: int) -> float:
            if step < spec.warmup_steps:
                return (step + 1) / spec.warmup_steps
            progress = (step - spec.warmup_steps) / max(spec.steps - spec.warmup_steps, 1)
            return 0.5 * (1.0 + torch.cos(torch.tensor(torch.pi * progress)).item())

        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
        start = time.perf_counter()
        model.train()
        loss = torch.tensor(float("nan"))
        for step in range(spec.steps):
            batch = sample_batch(corpus, spec.batch_size, spec.seed, step)
            loss = model(**batch.inputs, labels=batch.labels).loss
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
        seconds = time.perf_counter() - start
        model.eval()
        info = {"steps": spec.steps, "seconds": round(seconds, 1), "final-train-loss": round(float(loss.detach()), 4)}
        return model, info
    finally:
        torch.set_num_threads(threads)


def build_checkpoint(spec: PretrainSpec, target: Path, name: str) -> None:
    """Pretrain ``spec`` and save model, tokenizer and :data:`INFO_FILE` atomically at ``target``."""
    from .data.text import sentiment_tokenizer

    model, info = pretrain(spec)
    info = {"name": name, "key": spec.key(), "spec": dataclasses.asdict(spec), **info}
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        model.save_pretrained(staging)
        sentiment_tokenizer().save_pretrained(staging)
        (staging / INFO_FILE).write_text(json.dumps(info, indent=2) + "\n")
        os.replace(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    print(
        f"[pretrain] built {name} in {info['seconds']} s ({info['steps']} steps, final train loss "
        f"{info['final-train-loss']}): {target}",
        flush=True,
    )


def ensure_pretrained(name: str, cache_dir: str = "") -> str:
    """The checkpoint directory of the named pretrained model, pretraining it first if it is not cached.

    ``cache_dir`` is a ``pretrain.cache-dir`` value (empty: :func:`default_cache_dir`).
    """
    if name not in PRETRAINED_MODELS:
        raise ValueError(f"unknown pretrained model {name!r}; allowed: {', '.join(sorted(PRETRAINED_MODELS))}")
    return _ensure(name, str(resolve_cache_dir(cache_dir).resolve()))


@lru_cache(maxsize=8)
def _ensure(name: str, cache_dir: str) -> str:
    target = checkpoint_dir(name, Path(cache_dir))
    if not (target / INFO_FILE).exists():
        with open(Path(cache_dir) / f".{target.name}.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
            if not (target / INFO_FILE).exists():
                build_checkpoint(PRETRAINED_MODELS[name], target, name)
    return str(target)
