"""Split models, data partitioning, the deterministic minibatch draw, and text datasets from local files."""

import pytest
import torch

from hosfl_flower.data import load_federated_data, load_train_test, sample_batch
from hosfl_flower.models import SplitCNN, build_split_model
from hosfl_flower.split_server import SplitServer


def test_split_forward_equals_unsplit_and_every_cut_is_valid():
    x = torch.rand(4, 1, 8, 8)
    reference = build_split_model("cnn", 1, 10, seed=3)
    full = torch.nn.Sequential(*reference.client, *reference.server)
    for cut in range(1, 5):
        model = build_split_model("cnn", cut, 10, seed=3)
        assert torch.equal(model({"x": x}), full(x))
        assert len(model.client) == cut
    for bad in (0, 5):
        with pytest.raises(ValueError, match=f"cut-layer {bad} is outside"):
            SplitCNN(cut_layer=bad)


def test_same_seed_same_initial_weights():
    a, b, c = (build_split_model("cnn", 2, 10, seed=s) for s in (1, 1, 2))
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    assert not all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), c.state_dict().values()))


def test_split_server_step_equals_end_to_end_backprop():
    """The server's λ and θ_s update are those of backprop through the unsplit model."""
    model = build_split_model("cnn", 2, 10, seed=0)
    twin = build_split_model("cnn", 2, 10, seed=0)
    x, y = torch.rand(6, 1, 8, 8), torch.randint(0, 10, (6,))
    with torch.no_grad():
        smashed = model.smash({"x": x})
    server = SplitServer(model, optimizer="sgd", lr=0.1)
    result = server.step([(smashed, y)], [1.0])

    z = twin.client(x).detach().requires_grad_(True)
    loss = twin.loss(twin.server(z), y)
    loss.backward()
    with torch.no_grad():
        for p in twin.server.parameters():
            p -= 0.1 * p.grad
    assert torch.allclose(result.activation_grads[0], z.grad, atol=1e-7)
    assert abs(result.loss - float(loss.detach())) < 1e-6
    for a, b in zip(model.server.parameters(), twin.server.parameters()):
        assert torch.allclose(a, b, atol=1e-7)


def test_iid_and_dirichlet_partitions_cover_the_training_split():
    iid = load_federated_data("digits", 10, "iid", 0.3, 0, 0.2)
    sizes = [len(iid.partition(i)) for i in range(10)]
    assert sum(sizes) == 1797 - len(iid.test) and max(sizes) - min(sizes) <= 1
    skewed = load_federated_data("digits", 10, "dirichlet", 0.3, 0, 0.2)
    skewed_sizes = [len(skewed.partition(i)) for i in range(10)]
    assert sum(skewed_sizes) == sum(sizes)
    assert max(skewed_sizes) > 1.5 * min(skewed_sizes)
    label_share = torch.bincount(skewed.partition(0).labels, minlength=10).float() / skewed_sizes[0]
    assert label_share.max() > 0.2, "alpha=0.3 should skew the label mix"
    with pytest.raises(ValueError, match="partition-id 10"):
        iid.partition(10)


def test_minibatch_draw_is_deterministic():
    data = load_federated_data("digits", 10, "iid", 0.3, 0, 0.2).partition(0)
    a, b, c = sample_batch(data, 32, 0, 0, 5), sample_batch(data, 32, 0, 0, 5), sample_batch(data, 32, 0, 0, 6)
    assert torch.equal(a.labels, b.labels) and torch.equal(a.inputs["x"], b.inputs["x"])
    assert not torch.equal(a.inputs["x"], c.inputs["x"])
    assert len(sample_batch(data, 10_000, 0, 0, 1)) == len(data)


@pytest.fixture
def own_datasets_cache(tmp_path, monkeypatch):
    """What ``datasets.load_dataset`` caches of the generated files stays in the test's directory."""
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-cache")


def word_tokenizer(texts, directory):
    """A word-level tokenizer trained offline on ``texts`` and saved to ``directory``."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.train_from_iterator(texts, trainers.WordLevelTrainer(special_tokens=["<pad>", "<unk>"]))
    wrapped = PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>", unk_token="<unk>")
    wrapped.save_pretrained(directory)
    return wrapped


@pytest.fixture
def csv_text_dataset(tmp_path, own_datasets_cache):
    """A local text dataset in the hub's file layout: train.csv (40 reviews) and validation.csv (12 others)."""
    from hosfl_flower.data.text import sentiment_reviews

    root = tmp_path / "reviews"
    root.mkdir()
    train, validation = sentiment_reviews(40, seed=1), sentiment_reviews(12, seed=2)
    train.to_csv(root / "train.csv", index=False)
    validation.to_csv(root / "validation.csv", index=False)
    tokenizer = word_tokenizer(train["text"], tmp_path / "tokenizer")
    return root, train, validation, tokenizer


def test_a_local_text_dataset_is_evaluated_on_its_validation_split_with_the_tokenizer_key(csv_text_dataset, tmp_path):
    from hosfl_flower.config import resolve_run_config
    from hosfl_flower.task import data_options, text_spec

    root, train, validation, tokenizer = csv_text_dataset
    config = resolve_run_config(
        {"model": "tiny-llama", "dataset": str(root), "tokenizer": str(tmp_path / "tokenizer"), "max-length": 20}
    )
    assert text_spec(config).tokenizer == str(tmp_path / "tokenizer")
    rows, test, info = load_train_test(str(root), 0, 0.2, text_spec(config), options=data_options(config))
    assert len(rows) == 40 and len(test) == 12 and info.num_classes == 2 and info.vocab_size == len(tokenizer)
    assert test.labels.tolist() == list(validation["label"])
    encoded = tokenizer(list(validation["text"]), padding="max_length", truncation=True, max_length=20)["input_ids"]
    assert test.inputs["input_ids"].tolist() == encoded
    assert not (test.inputs["input_ids"] == tokenizer.unk_token_id).all(dim=1).any()

    held = resolve_run_config({**config, "data.eval-split": "held-out"})
    rows, test, _ = load_train_test(str(root), 0, 0.2, text_spec(held), options=data_options(held))
    assert len(rows) == 32 and len(test) == 8
    assert set(map(tuple, test.inputs["input_ids"].tolist())) <= set(
        map(tuple, tokenizer(list(train["text"]), padding="max_length", truncation=True, max_length=20)["input_ids"])
    )
    assert text_spec(resolve_run_config({"model": "tiny-llama", "dataset": str(root)})).tokenizer == "tiny-llama"


def test_a_template_names_columns_and_other_columns_stay_for_partitioners(tmp_path, own_datasets_cache):
    from datasets import Dataset

    from hosfl_flower.data import DataOptions, TextSpec

    pairs = {
        "premise": ["the movie was good", "the plot was bad", "it was fun", "the cast was weak"] * 3,
        "hypothesis": ["it was good", "it was good", "it was bad", "it was bad"] * 3,
        "label": [0, 1, 1, 0] * 3,
        "writer": [f"w{i % 3}" for i in range(12)],
    }
    root = tmp_path / "pairs"
    root.mkdir()
    Dataset.from_dict(pairs).to_parquet(str(root / "train-00000-of-00001.parquet"))
    Dataset.from_dict(pairs).select(range(4)).to_parquet(str(root / "test-00000-of-00001.parquet"))
    tokenizer = word_tokenizer(pairs["premise"] + pairs["hypothesis"] + ["?"], tmp_path / "tok")
    text = TextSpec(max_length=12, tokenizer=str(tmp_path / "tok"), template="{premise} ? {hypothesis}")
    rows, test, _ = load_train_test(str(root), 0, 0.2, text, options=DataOptions())
    assert len(test) == 4, "no validation split: the test split"
    assert test.inputs["input_ids"][1].tolist()[:8] == tokenizer("the plot was bad ? it was good")["input_ids"]
    assert "writer" in rows.column_names
    data = load_federated_data(
        str(root), 3, "natural-id", 0.3, 0, 0.2, text, partition=(("partition.natural-id-column", "writer"),)
    )
    assert sorted(len(data.partition(i)) for i in range(3)) == [4, 4, 4]


def test_sentiment_uses_the_tokenizer_key_when_set(csv_text_dataset, tmp_path):
    from hosfl_flower.data import TextSpec
    from hosfl_flower.data.text import sentiment_tokenizer

    *_, tokenizer = csv_text_dataset
    own = load_train_test("sentiment", 0, 0.2, TextSpec())
    assert own[2].vocab_size == len(sentiment_tokenizer())
    other = load_train_test("sentiment", 0, 0.2, TextSpec(tokenizer=str(tmp_path / "tokenizer")))
    assert other[2].vocab_size == len(tokenizer) and torch.equal(other[1].labels, own[1].labels)
    assert not torch.equal(other[1].inputs["input_ids"], own[1].inputs["input_ids"])


@pytest.mark.parametrize(
    "layers,key,message",
    [
        ({"data.eval-split": "dev"}, "data.eval-split", "must be held-out or a split of"),
        ({"data.label-column": "stars"}, "data.label-column", "no such column; columns: text, label"),
        ({"data.template": "{text} {mood}"}, "data.template", "names no column of the dataset"),
        ({"data.text-column": "review"}, "data.text-column", "no such column"),
    ],
)
def test_text_dataset_mistakes_fail_with_one_line(csv_text_dataset, tmp_path, layers, key, message):
    from hosfl_flower.config import ConfigError, resolve_run_config
    from hosfl_flower.task import data_options, text_spec

    root, *_ = csv_text_dataset
    with pytest.raises(ConfigError) as error:
        config = resolve_run_config(
            {"model": "tiny-llama", "dataset": str(root), "tokenizer": str(tmp_path / "tokenizer"), **layers}
        )
        load_train_test(config["dataset"], 0, 0.2, text_spec(config), options=data_options(config))
    text = str(error.value)
    assert f"invalid run-config value {key}=" in text and message in text and "\n" not in text
