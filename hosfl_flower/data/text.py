"""Text classification tasks for transformer models: an offline sentiment task and Hugging Face datasets.

The offline task (:func:`sentiment_task`) is generated deterministically from a seed: short reviews
such as ``"frankly the plot was not very clever but the music was superb . it was"`` labelled
negative (0) or positive (1). A clause's polarity is its adjective's (10 positive, 10 negative),
flipped by a negation (``not``, ``never``, ``hardly``; a quarter of the clauses). A review is one
clause (half of them), two opposite clauses joined by ``but`` where the second decides (a quarter),
or two agreeing clauses joined by ``and``. Word counts alone get about two thirds right (logistic
regression on counts: 66 % held out); the rest needs binding each negation to its adjective and
finding the clause after ``but``. Every review ends with the prompt ``"it was"``, whose next word
``"bad"`` / ``"good"`` is the verbalizer.

The pretraining corpus (:func:`review_corpus`) is unlabelled text in the same language without
negations, ``but`` or the prompt: documents of two to four clauses of one polarity joined by ``and``
or full stops (subjects include ``it``), so next-word prediction rewards tracking the polarity of
the text so far. It has its own generator and seeds and no labels, so no review of the federated
task is in it, and negation and ``but`` are what fine-tuning has to add.

Tokenised datasets have the columns ``input_ids``, ``attention_mask`` (right-padded to a fixed
``max_length``, so ``z`` has a fixed shape) and ``label``.
"""

from __future__ import annotations

import random
import string
from collections.abc import Sequence
from dataclasses import dataclass

import datasets
import numpy as np
import torch
from datasets import ClassLabel, Dataset
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

from ..options import ConfigError
from .examples import Examples
from .sources import count_classes

SPECIAL_TOKENS = ("<pad>", "<unk>", "<s>")
"""Ids 0, 1, 2 of the word-level tokenizer: padding, unknown word, start of text."""

SENTIMENT_LABEL_WORDS = ("bad", "good")
"""Verbalizer words of the offline task, by label."""

_OPENERS = ("honestly", "overall", "frankly", "i think", "in the end", "to me")
_SUBJECTS = (
    "the movie",
    "the film",
    "the plot",
    "the acting",
    "the music",
    "the ending",
    "the story",
    "this show",
    "the cast",
    "the script",
)
_VERBS = ("was", "is", "felt", "seemed")
_INTENSIFIERS = ("very", "really", "quite", "so", "truly")
_NEGATIONS = ("not", "never", "hardly")
_ADJECTIVES = (
    ("bad", "dull", "boring", "awful", "weak", "messy", "bland", "silly", "poor", "tedious"),
    ("good", "great", "fun", "brilliant", "lovely", "charming", "clever", "moving", "superb", "funny"),
)
_PROMPT = ". it was"
_NEGATED, _INTENSIFIED, _OPENED = 0.25, 0.4, 0.3  # shares of negated / intensified clauses, of reviews with an opener
_ONE_CLAUSE, _BUT = 0.5, 0.25  # shares of one-clause and "but" reviews (the rest: "and")
_CORPUS_AND = 0.7  # share of corpus clauses joined by "and" (the rest: a full stop)
_CORPUS_SUBJECTS = (*_SUBJECTS, "it")


def _clause(rng: random.Random, polarity: int, negation: float = _NEGATED, subjects: Sequence[str] = _SUBJECTS) -> str:
    negated = rng.random() < negation
    words = [rng.choice(subjects), rng.choice(_VERBS)]
    if negated:
        words.append(rng.choice(_NEGATIONS))
    if rng.random() < _INTENSIFIED:
        words.append(rng.choice(_INTENSIFIERS))
    words.append(rng.choice(_ADJECTIVES[polarity ^ negated]))
    return " ".join(words)


def sentiment_reviews(num_examples: int, seed: int) -> Dataset:
    """``num_examples`` generated reviews (columns ``text``, ``label``), balanced in expectation."""
    rng = random.Random(seed)
    texts, labels = [], []
    for _ in range(num_examples):
        label = rng.randrange(2)
        form = rng.random()
        if form < _ONE_CLAUSE:
            body = _clause(rng, label)
        elif form < _ONE_CLAUSE + _BUT:
            body = f"{_clause(rng, 1 - label)} but {_clause(rng, label)}"
        else:
            body = f"{_clause(rng, label)} and {_clause(rng, label)}"
        opener = f"{rng.choice(_OPENERS)} " if rng.random() < _OPENED else ""
        texts.append(f"{opener}{body} {_PROMPT}")
        labels.append(label)
    features = datasets.Features({"text": datasets.Value("string"), "label": ClassLabel(names=["negative", "positive"])})
    return Dataset.from_dict({"text": texts, "label": labels}, features=features)


CORPUS_VERSION = 1
"""Version of :func:`review_corpus`'s generator: bump it whenever the text it generates changes."""


def review_corpus(num_documents: int, seed: int) -> list[str]:
    """``num_documents`` unlabelled documents for causal-LM pretraining (see the module docstring)."""
    rng = random.Random(f"review-corpus-{seed}")  # a string seed: a different stream from sentiment_reviews
    documents = []
    for _ in range(num_documents):
        polarity = rng.randrange(2)
        words = [rng.choice(_OPENERS)] if rng.random() < _OPENED else []
        for index in range(rng.randint(2, 4)):
            if index:
                words.append("and" if rng.random() < _CORPUS_AND else ".")
            words.append(_clause(rng, polarity, negation=0.0, subjects=_CORPUS_SUBJECTS))
        documents.append(" ".join([*words, "."]))
    return documents


def sentiment_tokenizer() -> PreTrainedTokenizerFast:
    """The offline task's word-level tokenizer (no download): lower-cased words, ``.`` a word of its own,
    ``<s>`` prepended, right padding with id 0. Its vocabulary (``len(tokenizer)``) is below 128."""
    words = {word for phrase in (*_OPENERS, *_SUBJECTS, _PROMPT, "and but") for word in phrase.split()}
    words.update(_VERBS, _INTENSIFIERS, _NEGATIONS, *_ADJECTIVES)
    vocab = {token: index for index, token in enumerate([*SPECIAL_TOKENS, *sorted(words)])}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.normalizer = normalizers.Lowercase()
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", vocab["<s>"])])
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>", unk_token="<unk>", bos_token="<s>")


def template_fields(template: str) -> tuple[str, ...]:
    """The names ``template`` formats (``{text}`` is the text column; any other name is a column of that name)."""
    names = []
    for _, field, _, _ in string.Formatter().parse(template):
        if field is not None:
            name = field.split(".")[0].split("[")[0]
            if not name:
                raise ConfigError("data.template", template, "fields must be named: {text} or a column name")
            names.append(name)
    return tuple(dict.fromkeys(names))


def tokenize_dataset(
    dataset: Dataset,
    tokenizer: PreTrainedTokenizerBase,
    max_length: int,
    text_column: str = "text",
    label_column: str = "label",
    template: str = "{text}",
    keep_columns: Sequence[str] = (),
) -> Dataset:
    """Columns ``input_ids``, ``attention_mask`` (padded or truncated to ``max_length``) and ``label``,
    plus ``keep_columns`` unchanged.

    ``template`` formats each text (e.g. ``"{text} It was"`` for a verbalizer prompt; ``{text}`` is
    ``text_column``, any other field the column of that name, e.g. ``"{premise} ? {hypothesis}"``);
    truncation cuts the end, so ``max_length`` must leave room for the prompt.
    """
    fields = template_fields(template)
    sources = {field: text_column if field == "text" else field for field in fields}

    def encode(batch: dict) -> dict:
        columns = {field: batch[source] for field, source in sources.items()}
        rows = range(len(batch[label_column]))
        texts = [template.format(**{field: values[i] for field, values in columns.items()}) for i in rows]
        encoded = tokenizer(texts, padding="max_length", truncation=True, max_length=max_length)
        return {
            "input_ids": encoded["input_ids"],
            "attention_mask": encoded["attention_mask"],
            "label": batch[label_column],
        }

    removed = [column for column in dataset.column_names if column not in keep_columns]
    return dataset.map(encode, batched=True, remove_columns=removed)


def load_tokenizer(tokenizer: str | PreTrainedTokenizerBase) -> PreTrainedTokenizerBase:
    """A Hugging Face tokenizer (a name or directory for ``AutoTokenizer.from_pretrained``, or an instance);
    one without a pad token pads with its end-of-sequence token."""
    if isinstance(tokenizer, str):
        tokenizer = AutoTokenizer.from_pretrained(tokenizer)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


@dataclass(frozen=True)
class TextTask:
    """A tokenised classification dataset and what a model needs to know about it."""

    dataset: Dataset
    tokenizer: PreTrainedTokenizerBase
    num_classes: int
    max_length: int
    label_words: tuple[str, ...] = ()

    @property
    def pad_id(self) -> int:
        """The tokenizer's padding id."""
        return int(self.tokenizer.pad_token_id)

    @property
    def vocab_size(self) -> int:
        """The tokenizer's vocabulary size, special tokens included."""
        return len(self.tokenizer)

    @property
    def verbalizer_ids(self) -> tuple[int, ...]:
        """One token id per class (the ``verbalizer`` task's ids); each label word must be one token."""
        if len(self.label_words) != self.num_classes:
            raise ValueError(f"{self.num_classes} classes need {self.num_classes} label words, got {self.label_words}")
        ids = []
        for word in self.label_words:
            tokens = self.tokenizer.encode(word, add_special_tokens=False)
            if len(tokens) != 1:
                raise ValueError(f"label word {word!r} is {len(tokens)} tokens, not one")
            ids.append(tokens[0])
        return tuple(ids)


def sentiment_task(
    num_examples: int = 2000, seed: int = 0, max_length: int = 24, tokenizer: str | PreTrainedTokenizerBase | None = None
) -> TextTask:
    """The offline sentiment task: 2 classes, verbalizer words ``bad`` / ``good`` (reviews have at most 20 tokens
    with the task's own word-level tokenizer, the default)."""
    tokenizer = sentiment_tokenizer() if tokenizer is None else load_tokenizer(tokenizer)
    dataset = tokenize_dataset(sentiment_reviews(num_examples, seed), tokenizer, max_length)
    return TextTask(dataset, tokenizer, num_classes=2, max_length=max_length, label_words=SENTIMENT_LABEL_WORDS)


def text_task(
    raw: Dataset,
    tokenizer: str | PreTrainedTokenizerBase,
    max_length: int,
    text_column: str = "text",
    label_column: str = "label",
    template: str = "{text}",
    label_words: Sequence[str] = (),
    keep_columns: Sequence[str] = (),
) -> TextTask:
    """``raw`` (a labelled text dataset) tokenised by :func:`tokenize_dataset`; the number of classes is the
    ``ClassLabel``'s, or else the largest label plus one."""
    missing = [field for field in template_fields(template) if field != "text" and field not in raw.column_names]
    if "text" in template_fields(template) and text_column not in raw.column_names:
        raise ConfigError("data.text-column", text_column, f"no such column; columns: {', '.join(raw.column_names)}")
    if missing:
        raise ConfigError("data.template", template, f"names no column of the dataset; columns: {', '.join(raw.column_names)}")
    if label_column not in raw.column_names:
        raise ConfigError("data.label-column", label_column, f"no such column; columns: {', '.join(raw.column_names)}")
    num_classes = count_classes(raw, label_column)
    tokenizer = load_tokenizer(tokenizer)
    dataset = tokenize_dataset(raw, tokenizer, max_length, text_column, label_column, template, keep_columns)
    return TextTask(dataset, tokenizer, num_classes=num_classes, max_length=max_length, label_words=tuple(label_words))


def load_text_task(
    path: str,
    tokenizer: str | PreTrainedTokenizerBase,
    max_length: int,
    split: str = "train",
    data_files: str | Sequence[str] | dict | None = None,
    text_column: str = "text",
    label_column: str = "label",
    template: str = "{text}",
    label_words: Sequence[str] = (),
) -> TextTask:
    """One split of a hub dataset or local files (``datasets.load_dataset(path, data_files=..., split=...)``)
    as a :func:`text_task`."""
    raw = datasets.load_dataset(path, data_files=data_files, split=split)
    return text_task(raw, tokenizer, max_length, text_column, label_column, template, label_words)


def text_examples(dataset: Dataset, task: str = "classification") -> Examples:
    """Tensors for a split transformer: ``input_ids`` and ``attention_mask`` ``(n, max_length)``, and labels:
    the class ``(n,)``, or for ``causal-lm`` the token ids ``(n, max_length)`` with -100 at padding."""
    table = dataset.with_format("numpy")
    input_ids = torch.from_numpy(np.asarray(table["input_ids"], dtype=np.int64))
    attention_mask = torch.from_numpy(np.asarray(table["attention_mask"], dtype=np.int64))
    if task == "causal-lm":
        labels = input_ids.masked_fill(attention_mask == 0, -100)
    else:
        labels = torch.from_numpy(np.asarray(table["label"], dtype=np.int64))
    return Examples({"input_ids": input_ids, "attention_mask": attention_mask}, labels)
