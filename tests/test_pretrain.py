"""The pretrained starting point: cache key, reuse, determinism, what pretraining buys, and a bad cache dir.

Every test uses a private temporary cache directory; all but one use a small spec (a few seconds).
"""

import dataclasses

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from hosfl_flower import pretrain
from hosfl_flower.config import ConfigError, resolve_run_config
from hosfl_flower.pretrain import PRETRAINED_MODELS, PretrainSpec, causal_lm_loss, ensure_pretrained, heldout_examples
from hosfl_flower.task import build_model, model_source

SMALL = PretrainSpec("tiny-llama", corpus_documents=400, steps=20, batch_size=16, warmup_steps=5)
NAME = "pretrained-test-small"
MARGIN = 2.5  # nats per token; measured: pretrained 1.60, random init 4.85 on held-out corpus documents


@pytest.fixture
def small_model(monkeypatch):
    """Register the small spec under :data:`NAME` (and forget cached lookups before and after)."""
    monkeypatch.setitem(PRETRAINED_MODELS, NAME, SMALL)
    pretrain._ensure.cache_clear()
    yield NAME
    pretrain._ensure.cache_clear()


def test_cache_key_changes_with_everything_that_determines_the_checkpoint(monkeypatch, tmp_path):
    key = SMALL.key()
    assert PretrainSpec(**dataclasses.asdict(SMALL)).key() == key  # an equal spec: the same key
    changed = {
        "base": "tiny-mistral",
        "overrides": (("hidden_size", 48),),
        "corpus_seed": 1,
        "corpus_documents": 401,
        "max_length": 30,
        "steps": 21,
        "batch_size": 17,
        "lr": 1e-3,
        "warmup_steps": 6,
        "weight_decay": 0.0,
        "seed": 1,
    }
    assert set(changed) == {field.name for field in dataclasses.fields(PretrainSpec)}
    keys = {name: dataclasses.replace(SMALL, **{name: value}).key() for name, value in changed.items()}
    assert all(k != key for k in keys.values()), keys
    assert len(set(keys.values())) == len(keys)
    import transformers

    import hosfl_flower.data.text as text

    for module, constant, value in (
        (pretrain, "FORMAT_VERSION", pretrain.FORMAT_VERSION + 1),
        (text, "CORPUS_VERSION", text.CORPUS_VERSION + 1),
        (torch, "__version__", "0.0"),
        (transformers, "__version__", "0.0"),
    ):
        with monkeypatch.context() as patch:
            patch.setattr(module, constant, value)
            assert SMALL.key() != key, constant
    monkeypatch.setitem(PRETRAINED_MODELS, NAME, SMALL)  # where the cache lives is not part of the key
    assert pretrain.checkpoint_dir(NAME, tmp_path / "a").name == pretrain.checkpoint_dir(NAME, tmp_path / "b").name


def test_a_second_load_reuses_the_checkpoint(small_model, tmp_path, capsys, monkeypatch):
    path = ensure_pretrained(small_model, str(tmp_path))
    assert "[pretrain] built" in capsys.readouterr().out
    pretrain._ensure.cache_clear()  # as a fresh process would

    def refuse(*args):
        raise AssertionError("pretrained again")

    monkeypatch.setattr(pretrain, "build_checkpoint", refuse)
    assert ensure_pretrained(small_model, str(tmp_path)) == path
    assert capsys.readouterr().out == ""
    # it loads through the ordinary split-model path, as a local checkpoint directory
    config = resolve_run_config(
        {"model": small_model, "pretrain.cache-dir": str(tmp_path), "dataset": "sentiment", "cut-layer": 1, "lora.rank": 4}
    )
    from hosfl_flower.data import DataInfo

    model = build_model(config, DataInfo(2, lambda dataset: dataset))
    weights = load_file(f"{path}/model.safetensors")
    assert torch.equal(model.client.embed_tokens.weight, weights["model.embed_tokens.weight"])
    assert model_source(config) == path


def test_two_builds_give_equal_tensors(small_model, tmp_path):
    first = load_file(f"{ensure_pretrained(small_model, str(tmp_path / 'a'))}/model.safetensors")
    second = load_file(f"{ensure_pretrained(small_model, str(tmp_path / 'b'))}/model.safetensors")
    assert first.keys() == second.keys()
    assert all(torch.equal(first[k], second[k]) for k in first)  # bit for bit: one thread, fixed seeds


@pytest.mark.slow
def test_the_pretrained_model_beats_random_initialisation_on_held_out_text(tmp_path):
    name = "pretrained-tiny-llama"
    spec = PRETRAINED_MODELS[name]
    path = ensure_pretrained(name, str(tmp_path))
    held_out = heldout_examples(spec)
    pretrained = causal_lm_loss(AutoModelForCausalLM.from_pretrained(path), held_out)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(spec.seed)
        random_init = causal_lm_loss(AutoModelForCausalLM.from_config(spec.model_config()), held_out)
    assert pretrained <= random_init - MARGIN, (pretrained, random_init)


def test_a_bad_cache_dir_is_a_one_line_error(small_model, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    config = resolve_run_config({"model": small_model, "pretrain.cache-dir": str(blocker / "cache"), "dataset": "sentiment"})
    with pytest.raises(ConfigError) as error:
        model_source(config)
    assert error.value.key == "pretrain.cache-dir"
    assert "\n" not in str(error.value)
