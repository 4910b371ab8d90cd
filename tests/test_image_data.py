"""Image datasets on disk (imagefolder PNGs, save_to_disk, parquet), their evaluation split, column
detection, the transform to tensors and caching. Every dataset is generated here, offline."""

from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
from datasets import ClassLabel, Dataset, DatasetDict, Features, Value
from datasets import Image as ImageFeature
from PIL import Image

import hosfl_flower.data.images as images
from hosfl_flower.config import ConfigError, resolve_run_config
from hosfl_flower.data import DataOptions, ImageSpec, is_image_dataset, load_federated_data, load_train_test
from hosfl_flower.data.images import image_tensor
from hosfl_flower.task import data_options, image_spec


@pytest.fixture(autouse=True)
def own_datasets_cache(tmp_path, monkeypatch):
    """What ``datasets.load_dataset`` caches of the generated files stays in the test's directory."""
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-cache")


CLASSES = ("cat", "dog", "eel")
PER_CLASS = {"train": 8, "validation": 4}
SPEC = ImageSpec(10, 3, (0.5, 0.4, 0.3), (0.2, 0.25, 0.5))


def picture(index: int, label: int) -> np.ndarray:
    """A 10×10 RGB image: channel ``label`` bright, the others dim noise; pixel (0, 0) holds ``index``."""
    rng = np.random.default_rng(index)
    pixels = rng.integers(0, 60, (10, 10, 3), dtype=np.uint8)
    pixels[..., label] = rng.integers(180, 256, (10, 10), dtype=np.uint8)
    pixels[0, 0] = index
    return pixels


def generated(splits=("train", "validation")) -> dict[str, list[tuple[int, int, np.ndarray]]]:
    """``split -> [(index, label, pixels)]`` with indices unique across splits."""
    rows, index = {}, 0
    for split in splits:
        rows[split] = []
        for label in range(len(CLASSES)):
            for _ in range(PER_CLASS.get(split, 4)):
                rows[split].append((index, label, picture(index, label)))
                index += 1
    return rows


def as_dataset(rows) -> Dataset:
    features = Features({"image": ImageFeature(), "label": ClassLabel(names=list(CLASSES))})
    return Dataset.from_dict(
        {"image": [Image.fromarray(p) for _, _, p in rows], "label": [label for _, label, _ in rows]}, features=features
    )


def write_imagefolder(root: Path, rows: dict, split_folders: bool = True) -> Path:
    for split, items in rows.items():
        for index, label, pixels in items:
            folder = (root / split if split_folders else root) / CLASSES[label]
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(pixels).save(folder / f"{index:03d}.png")
    return root


def write_disk(root: Path, rows: dict) -> Path:
    DatasetDict({split: as_dataset(items) for split, items in rows.items()}).save_to_disk(str(root))
    return root


def write_parquet(root: Path, rows: dict) -> Path:
    (root / "data").mkdir(parents=True)
    for split, items in rows.items():
        as_dataset(items).to_parquet(str(root / "data" / f"{split}-00000-of-00001.parquet"))
    return root


WRITERS = {"imagefolder": write_imagefolder, "save_to_disk": write_disk, "parquet": write_parquet}


def expected(pixels: np.ndarray, spec: ImageSpec = SPEC) -> torch.Tensor:
    x = torch.from_numpy(pixels).permute(2, 0, 1).float() / 255.0
    return (x - torch.tensor(spec.mean).view(-1, 1, 1)) / torch.tensor(spec.std).view(-1, 1, 1)


def indices_of(x: torch.Tensor, spec: ImageSpec = SPEC) -> list[int]:
    """The index each transformed image carries in pixel (0, 0)."""
    raw = x[:, 0, 0, 0] * spec.std[0] + spec.mean[0]
    return torch.round(raw * 255).to(torch.int64).tolist()


def assert_examples_are(examples, rows) -> None:
    by_index = {index: (label, pixels) for index, label, pixels in rows}
    found = indices_of(examples.inputs["x"])
    assert sorted(found) == sorted(by_index)
    for row, index in enumerate(found):
        label, pixels = by_index[index]
        assert int(examples.labels[row]) == label
        assert torch.allclose(examples.inputs["x"][row], expected(pixels), atol=1e-6)


@pytest.mark.parametrize("layout", list(WRITERS))
def test_the_validation_split_is_evaluated_and_held_out_is_a_share_of_train(layout, tmp_path):
    rows = generated()
    root = str(WRITERS[layout](tmp_path / layout, rows))
    assert is_image_dataset(root)
    train, test, info = load_train_test(root, 0, 0.25, image=SPEC)
    assert test.inputs["x"].shape == (12, 3, 10, 10) and test.inputs["x"].dtype == torch.float32
    assert test.labels.dtype == torch.int64
    assert_examples_are(test, rows["validation"])
    assert len(train) == 24 and info.num_classes == 3 and info.label_column == "label" and info.vocab_size is None
    assert_examples_are(info.to_examples(train), rows["train"])

    train, test, _ = load_train_test(root, 0, 0.25, image=SPEC, options=DataOptions(eval_split="held-out"))
    assert len(test) == 6 and len(train) == 18
    held_out = set(indices_of(test.inputs["x"]))
    assert held_out <= {index for index, _, _ in rows["train"]}
    assert held_out.isdisjoint(indices_of(info.to_examples(train).inputs["x"]))


def test_auto_falls_back_to_test_then_to_held_out(tmp_path):
    rows = generated(("train", "test"))
    _, test, _ = load_train_test(str(write_disk(tmp_path / "with-test", rows)), 0, 0.25, image=SPEC)
    assert_examples_are(test, rows["test"])
    flat = write_imagefolder(tmp_path / "flat", {"train": generated(("train",))["train"]}, split_folders=False)
    train, test, info = load_train_test(str(flat), 0, 0.25, image=SPEC)
    assert len(test) == 6 and len(train) == 18 and info.num_classes == 3


@pytest.mark.parametrize(
    "eval_split,message",
    [("dev", "must be held-out or a split of"), ("train", "other than train: validation")],
)
def test_an_absent_eval_split_names_the_splits(eval_split, message, tmp_path):
    root = str(write_disk(tmp_path / "d", generated()))
    with pytest.raises(ConfigError) as error:
        load_train_test(root, 0, 0.25, image=SPEC, options=DataOptions(eval_split=eval_split))
    text = str(error.value)
    assert f"data.eval-split={eval_split!r}" in text and message in text and "\n" not in text


def test_an_unlabelled_eval_split_is_refused(tmp_path):
    rows = generated(("train", "test"))
    splits = {"train": as_dataset(rows["train"]), "test": as_dataset(rows["test"]).cast_column("label", Value("int64"))}
    splits["test"] = splits["test"].map(lambda row: {"label": -1})
    DatasetDict(splits).save_to_disk(str(tmp_path / "d"))
    with pytest.raises(ConfigError, match=r"data.eval-split='test': has labels outside 0..2 \(-1..-1: unlabelled\?\)"):
        load_train_test(str(tmp_path / "d"), 0, 0.25, image=SPEC)


def columns_dataset(tmp_path: Path, **columns) -> str:
    """A save_to_disk dataset of 6 images with the given extra columns (name -> (feature, values))."""
    pictures = [Image.fromarray(picture(i, i % 3)) for i in range(6)]
    data = {"photo": pictures, **{name: values for name, (_, values) in columns.items()}}
    features = Features({"photo": ImageFeature(), **{name: feature for name, (feature, _) in columns.items()}})
    path = tmp_path / "-".join(["d", *columns])
    Dataset.from_dict(data, features=features).save_to_disk(str(path))
    return str(path)


LABELS = [0, 1, 2, 0, 1, 2]
CLASS3 = ClassLabel(names=["a", "b", "c"])


def test_the_image_and_label_columns_are_found_when_unambiguous(tmp_path):
    cifar100_like = columns_dataset(
        tmp_path, fine_label=(CLASS3, LABELS), coarse_label=(ClassLabel(names=["x", "y"]), [0, 1] * 3)
    )
    _, test, info = load_train_test(cifar100_like, 0, 0.5, image=SPEC)
    assert info.label_column == "fine_label" and info.num_classes == 3 and len(test) == 3
    one_class_label = columns_dataset(tmp_path, kind=(CLASS3, LABELS), target=(Value("int64"), [5] * 6))
    assert load_train_test(one_class_label, 0, 0.5, image=SPEC)[2].label_column == "kind"
    integers = columns_dataset(tmp_path, labels=(Value("int64"), [0, 4, 1, 0, 4, 1]))
    _, _, info = load_train_test(integers, 0, 0.5, image=SPEC)
    assert info.label_column == "labels" and info.num_classes == 5, "no ClassLabel: the largest label plus one"
    two_images = columns_dataset(tmp_path, label=(CLASS3, LABELS), sketch=(ImageFeature(), [Image.new("L", (3, 3))] * 6))
    _, test, info = load_train_test(two_images, 0, 0.5, image=SPEC, options=DataOptions(image_column="photo"))
    assert test.inputs["x"].shape == (3, 3, 10, 10)


@pytest.mark.parametrize(
    "columns,options,key,message",
    [
        ({"sketch": (ImageFeature(), [Image.new("L", (3, 3))] * 6)}, {}, "data.image-column", "several image columns"),
        ({"a": (CLASS3, LABELS), "b": (CLASS3, LABELS)}, {}, "data.label-column", "2 ClassLabel columns); name one of: a, b"),
        ({"size": (Value("int64"), LABELS)}, {}, "data.label-column", "no ClassLabel column); name one of: size"),
        ({"label": (CLASS3, LABELS)}, {"label_column": "kind"}, "data.label-column", "no such column; columns: photo, label"),
        ({"label": (CLASS3, LABELS)}, {"image_column": "picture"}, "data.image-column", "no such column"),
        ({"label": (Value("string"), list("abcabc"))}, {}, "data.label-column", "not integer class ids"),
    ],
)
def test_ambiguous_or_wrong_columns_fail_with_one_line(columns, options, key, message, tmp_path):
    path = columns_dataset(tmp_path, **columns)
    with pytest.raises(ConfigError) as error:
        load_train_test(path, 0, 0.5, image=SPEC, options=DataOptions(**options))
    text = str(error.value)
    assert f"invalid run-config value {key}=" in text and message in text and "\n" not in text


def test_the_transform_converts_resizes_and_normalises_exactly():
    red = Image.new("RGB", (10, 10), (255, 0, 0))
    grey = Image.new("L", (7, 5), 51)
    rgb = image_tensor([red, grey], ImageSpec(4, 3, (0.5, 0.5, 0.5), (0.25, 0.5, 0.25)))
    assert rgb.shape == (2, 3, 4, 4) and rgb.dtype == torch.float32 and rgb.is_contiguous()
    assert torch.equal(rgb[0, 0], torch.full((4, 4), 2.0)) and torch.equal(rgb[0, 1], torch.full((4, 4), -1.0))
    assert torch.equal(rgb[0, 2], torch.full((4, 4), -2.0))
    assert torch.allclose(rgb[1], (torch.full((3, 4, 4), 0.2) - 0.5) / torch.tensor([0.25, 0.5, 0.25]).view(3, 1, 1))
    luma = image_tensor([red], ImageSpec(6, 1, (0.0,), (1.0,)))  # L = 299/1000 R
    assert luma.shape == (1, 1, 6, 6) and torch.equal(luma, torch.full((1, 1, 6, 6), 76 / 255.0))
    pattern = picture(3, 1)
    assert torch.equal(image_tensor([Image.fromarray(pattern)], SPEC)[0], expected(pattern))
    shrunk = image_tensor([Image.fromarray(pattern)], ImageSpec(5, 3, SPEC.mean, SPEC.std))[0]
    reference = np.array(Image.fromarray(pattern).resize((5, 5), Image.Resampling.BILINEAR))
    assert torch.equal(shrunk, expected(reference))
    assert image_tensor([], SPEC).shape == (0, 3, 10, 10)


@pytest.mark.parametrize(
    "fields,message",
    [
        ((0, 3, (0.5,) * 3, (0.5,) * 3), "image_size must be >= 1"),
        ((8, 4, (0.5,) * 4, (0.5,) * 4), "num_channels must be 1 (L) or 3 (RGB)"),
        ((8, 3, (0.5,), (0.5,)), "one value per channel"),
        ((8, 1, (0.5,), (0.0,)), "std (0.0,) finite and > 0"),
    ],
)
def test_an_image_spec_checks_its_fields(fields, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        ImageSpec(*fields)


def test_loading_twice_decodes_once(tmp_path, monkeypatch):
    calls = []
    decode = images.image_tensor
    monkeypatch.setattr(images, "image_tensor", lambda batch, spec: calls.append(len(batch)) or decode(batch, spec))
    root = str(write_imagefolder(tmp_path / "f", generated()))
    first = load_train_test(root, 0, 0.25, image=SPEC)
    assert calls == [12], "the validation split, decoded once"
    assert load_train_test(root, 0, 0.25, image=SPEC) is first and calls == [12]
    data = load_federated_data(root, 3, "iid", 0.3, 0, 0.25, image=SPEC)
    part = data.partition(1)
    assert calls == [12, 8] and len(part) == 8
    assert data.partition(1) is part and load_federated_data(root, 3, "iid", 0.3, 0, 0.25, image=SPEC) is data
    assert calls == [12, 8]


def test_label_partitioners_split_by_the_dataset_label_column(tmp_path):
    pictures = [Image.fromarray(picture(i, LABELS[i % 6])) for i in range(24)]
    features = Features({"photo": ImageFeature(), "fine_label": CLASS3, "coarse_label": CLASS3})
    Dataset.from_dict({"photo": pictures, "fine_label": LABELS * 4, "coarse_label": [0] * 24}, features=features).save_to_disk(
        str(tmp_path / "cifar")
    )
    data = load_federated_data(
        str(tmp_path / "cifar"),
        3,
        "pathological",
        0.3,
        0,
        0.25,
        partition=(("partition.num-classes-per-partition", 1), ("partition.class-assignment-mode", "deterministic")),
        image=SPEC,
    )
    assert [set(data.partition(i).labels.tolist()) for i in range(3)] == [{0}, {1}, {2}]


def test_the_run_config_reaches_the_image_loader(tmp_path):
    from transformers import ViTConfig, ViTImageProcessor

    model = tmp_path / "vit"
    processor = ViTImageProcessor(size={"height": 6, "width": 6}, image_mean=[0.1, 0.2, 0.3], image_std=[0.5, 0.5, 0.5])
    processor.save_pretrained(model)
    ViTConfig(image_size=6, num_channels=3).save_pretrained(model)
    rows = generated(("train", "test", "validation"))
    root = str(write_parquet(tmp_path / "pq", rows))
    config = resolve_run_config({"model": str(model), "dataset": root, "data.eval-split": "test"})
    spec = image_spec(config)
    assert spec == ImageSpec(6, 3, (0.1, 0.2, 0.3), (0.5, 0.5, 0.5))
    _, test, _ = load_train_test(root, 0, 0.2, image=spec, options=data_options(config))
    assert test.inputs["x"].shape == (12, 3, 6, 6)
    assert sorted(test.labels.tolist()) == sorted(label for _, label, _ in rows["test"])
    assert image_spec(resolve_run_config({"dataset": "digits"})) is None
