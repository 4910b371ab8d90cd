"""Loading a dataset's splits (a hub name or a local directory or file), choosing the training and
evaluation splits, and finding the image and label columns.

A local directory is read as what it holds: ``Dataset.save_to_disk`` / ``DatasetDict.save_to_disk``
output (``state.json`` / ``dataset_dict.json``), else an ``imagefolder`` (class subfolders of
images), parquet, CSV or JSON files. Splits come from file and folder names as on the hub
(``train/``, ``validation/``, ``test/``; ``train-*.parquet``, ``data/validation-*.parquet``, ``test.csv``).
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from ..options import ConfigError

if TYPE_CHECKING:
    from datasets import Dataset, DatasetDict

BUNDLED = ("digits", "sentiment")
"""The datasets that need no download; they have no splits of their own (evaluated on a held-out share)."""

HELD_OUT = "held-out"
"""The ``data.eval-split`` value that evaluates on a held-out share of the training split."""

AUTO_EVAL_SPLITS = ("validation", "test")
"""What ``data.eval-split=""`` evaluates on: the first of these splits the dataset has (else held out)."""

LABEL_NAMES = ("label", "labels", "fine_label", "target", "class")
"""Column names taken for the label column when the dataset has no single ``ClassLabel``."""

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"})
FILE_BUILDERS = {".parquet": "parquet", ".csv": "csv", ".json": "json", ".jsonl": "json"}
_IMAGEFOLDER_METADATA = frozenset({"metadata.csv", "metadata.jsonl"})


def local_format(path: Path) -> str:
    """What a local directory holds: ``disk`` (``save_to_disk`` output), ``imagefolder``, ``parquet``, ``csv`` or ``json``."""
    if (path / "dataset_dict.json").is_file() or (path / "state.json").is_file():
        return "disk"
    found: set[str] = set()
    metadata: set[str] = set()  # an imagefolder's metadata.csv / metadata.jsonl
    for file in path.rglob("*"):
        if not file.is_file() or any(part.startswith(".") for part in file.relative_to(path).parts):
            continue
        suffix = file.suffix.lower()
        if suffix in IMAGE_SUFFIXES:
            found.add("imagefolder")
        elif suffix in FILE_BUILDERS:
            (metadata if file.name in _IMAGEFOLDER_METADATA else found).add(FILE_BUILDERS[suffix])
    if "imagefolder" not in found:
        found |= metadata
    if len(found) != 1:
        what = f"mixes {', '.join(sorted(found))} files" if found else "holds no images, parquet, CSV or JSON files"
        raise ConfigError("dataset", str(path), f"the directory {what}")
    return found.pop()


@lru_cache(maxsize=4)
def load_splits(dataset: str, subset: str = "") -> DatasetDict:
    """Every split of ``dataset`` (a local directory or file, else a hub name with optional ``subset``), cached."""
    import datasets

    path = Path(dataset).expanduser()
    if (path.is_dir() or path.is_file()) and subset:
        raise ConfigError("data.subset", subset, f"applies to hub datasets only; {dataset} is a local path")
    if path.is_dir():
        kind = local_format(path)
        loaded = datasets.load_from_disk(str(path)) if kind == "disk" else datasets.load_dataset(kind, data_dir=str(path))
    elif path.is_file():
        builder = FILE_BUILDERS.get(path.suffix.lower())
        if builder is None:
            raise ConfigError("dataset", dataset, f"a local file must be one of {', '.join(sorted(FILE_BUILDERS))}")
        loaded = datasets.load_dataset(builder, data_files=str(path))
    else:
        try:
            loaded = datasets.load_dataset(dataset, subset or None)
        except (FileNotFoundError, ConnectionError, ValueError, datasets.exceptions.DatasetsError) as error:
            message = " ".join(str(error).split())
            raise ConfigError("dataset", dataset, f"not a local path, and not loadable from the hub: {message}") from error
    if isinstance(loaded, datasets.Dataset):
        loaded = datasets.DatasetDict({"train": loaded})
    return loaded


def check_bundled_eval_split(dataset: str, eval_split: str) -> None:
    """A bundled dataset is evaluated on a held-out share only."""
    if dataset in BUNDLED and eval_split not in ("", HELD_OUT):
        raise ConfigError("data.eval-split", eval_split, f"{dataset} has no splits; use {HELD_OUT} or leave it empty")


def choose_splits(dataset: str, splits: DatasetDict, eval_split: str) -> tuple[Dataset, Dataset | None, str]:
    """The training split, the evaluation split (``None``: hold out part of the training split) and its name.

    ``eval_split``: empty picks the first of :data:`AUTO_EVAL_SPLITS` the dataset has, ``held-out``
    none, anything else that split.
    """
    names = ", ".join(splits)
    if "train" not in splits:
        raise ConfigError("dataset", dataset, f"has no train split; its splits: {names}")
    if eval_split == HELD_OUT:
        return splits["train"], None, HELD_OUT
    if not eval_split:
        name = next((split for split in AUTO_EVAL_SPLITS if split in splits), HELD_OUT)
        return splits["train"], splits[name] if name != HELD_OUT else None, name
    if eval_split == "train" or eval_split not in splits:
        others = ", ".join(split for split in splits if split != "train") or "none"
        raise ConfigError("data.eval-split", eval_split, f"must be {HELD_OUT} or a split of {dataset} other than train: {others}")
    return splits["train"], splits[eval_split], eval_split


def _no_column(key: str, name: str, dataset: Dataset) -> ConfigError:
    return ConfigError(key, name, f"no such column; columns: {', '.join(dataset.column_names)}")


def find_image_column(dataset: Dataset, name: str = "") -> str | None:
    """``name`` if given (it must exist), else the one ``datasets.Image`` column, or ``None`` when there is none."""
    from datasets import Image

    if name:
        if name not in dataset.column_names:
            raise _no_column("data.image-column", name, dataset)
        return name
    images = [column for column, feature in dataset.features.items() if isinstance(feature, Image)]
    if len(images) > 1:
        raise ConfigError("data.image-column", "", f"the dataset has several image columns ({', '.join(images)}); name one")
    return images[0] if images else None


def find_label_column(dataset: Dataset, name: str = "", exclude: Sequence[str] = ()) -> str:
    """``name`` if given (it must exist), else the one ``ClassLabel`` column, else the one column named as in
    :data:`LABEL_NAMES` (among the ``ClassLabel`` columns when there are several)."""
    from datasets import ClassLabel

    if name:
        if name not in dataset.column_names:
            raise _no_column("data.label-column", name, dataset)
        return name
    columns = [column for column in dataset.column_names if column not in exclude]
    class_labels = [column for column in columns if isinstance(dataset.features[column], ClassLabel)]
    if len(class_labels) == 1:
        return class_labels[0]
    named = [column for column in (class_labels or columns) if column in LABEL_NAMES]
    if len(named) == 1:
        return named[0]
    reason = f"{len(class_labels)} ClassLabel columns" if class_labels else "no ClassLabel column"
    if len(named) > 1:
        reason += f" and several label-like names ({', '.join(named)})"
    raise ConfigError("data.label-column", "", f"cannot tell the label column ({reason}); name one of: {', '.join(columns)}")


def count_classes(dataset: Dataset, column: str) -> int:
    """The ``ClassLabel``'s number of classes, else the largest label plus one (labels must be integers)."""
    from datasets import ClassLabel, Value

    feature = dataset.features[column]
    if isinstance(feature, ClassLabel):
        return int(feature.num_classes)
    if not (isinstance(feature, Value) and feature.dtype.startswith(("int", "uint"))):
        raise ConfigError("data.label-column", column, f"holds {feature}, not integer class ids")
    labels = np.asarray(dataset[column])
    if len(labels) == 0 or labels.min() < 0:
        raise ConfigError("data.label-column", column, "needs class ids >= 0 in the training split")
    return int(labels.max()) + 1


def check_eval_labels(dataset: Dataset, split: str, column: str, num_classes: int) -> None:
    """The evaluation split has the label column and only class ids ``0..num_classes-1`` (hub test splits often hold -1)."""
    if column not in dataset.column_names:
        raise ConfigError("data.eval-split", split, f"has no label column {column!r}")
    labels = np.asarray(dataset[column])
    if len(labels) == 0:
        raise ConfigError("data.eval-split", split, "is empty")
    if labels.min() < 0 or labels.max() >= num_classes:
        raise ConfigError(
            "data.eval-split",
            split,
            f"has labels outside 0..{num_classes - 1} ({labels.min()}..{labels.max()}: unlabelled?); "
            f"name a labelled split or {HELD_OUT}",
        )
