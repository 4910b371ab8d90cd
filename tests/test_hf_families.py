"""Split families beyond the shared exactness tests: Gemma-3's masks and logits, tied embeddings,
refused model types, the vocabulary override and quiet checkpoint loading."""

import json
import logging

import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    BloomConfig,
    GraniteConfig,
    MistralConfig,
    PretrainedConfig,
)
from transformers.utils import logging as transformers_logging

from hosfl_flower.models.hf import (
    SPLIT_FAMILIES,
    TINY_VOCAB_SIZE,
    apply_lora,
    attention_kinds,
    build_hf_split_model,
    library_model,
    split_library_model,
    tiny_config,
)

from .test_hf_split import LORA, assert_split_is_exact, build, one_thread, padded_batch, unsplit_logits  # noqa: F401

SUPPORTED = ", ".join(sorted(SPLIT_FAMILIES))
GRANITE_FIELDS = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
)


def variant(name: str, **changes) -> PretrainedConfig:
    """A tiny configuration with some fields changed (through the constructor, so derived fields follow)."""
    config = tiny_config(name)
    return type(config)(**{**config.to_dict(), **changes})


def randomize_trainable(model) -> None:
    """Random trainable tensors (LoRA's B starts at zero), as the shared ``build`` helper does."""
    generator = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.copy_(0.1 * torch.randn(param.shape, generator=generator))


# ---------------------------------------------------------------------------------------- Gemma-3
def test_gemma3_sliding_window_masks_something_at_length_12_on_both_sides():
    model = build("tiny-gemma3")
    assert model.attention_types == ["sliding_attention", "full_attention", "sliding_attention"]
    assert model.layout.rotary_takes_layer_type  # a local and a global rotary base
    inputs = padded_batch()
    windowed = model(inputs)
    model.config.sliding_window = 64  # the masks read the window when they are built
    assert not torch.allclose(model(inputs), windowed, atol=1e-3), "a window of 4 must matter at length 12"
    assert torch.allclose(model(inputs), unsplit_logits(model, inputs), atol=1e-5)
    model.config.sliding_window = 4
    smashed = model.smash(inputs)
    windowed_server = model.head(smashed)
    model.config.sliding_window = 64
    assert not torch.allclose(model.head(smashed), windowed_server, atol=1e-3), "the server's sliding layer"


@pytest.mark.parametrize("padding", ["right", "left"])
def test_gemma3_bidirectional_attention_splits_exactly(padding):
    config = variant("tiny-gemma3", use_bidirectional_attention=True, num_labels=3)
    unsplit = AutoModelForSequenceClassification.from_config(config).eval()
    assert_split_is_exact(split_library_model(unsplit, 2, "classification"), padding)


@pytest.mark.parametrize("task", ["causal-lm", "verbalizer"])
def test_gemma3_soft_capped_logits_split_exactly(task):
    unsplit = AutoModelForCausalLM.from_config(variant("tiny-gemma3", final_logit_softcapping=0.5)).eval()
    model = split_library_model(unsplit, 2, task, [5, 9, 17] if task == "verbalizer" else None)
    assert float(model(padded_batch()).detach().abs().max()) <= 0.5
    assert_split_is_exact(model)


# ---------------------------------------------------------------------------------------- tied embeddings
def tied_causal_lm(name: str):
    unsplit = AutoModelForCausalLM.from_config(variant(name, tie_word_embeddings=True)).eval()
    assert unsplit.get_output_embeddings().weight is unsplit.get_input_embeddings().weight
    return unsplit


@pytest.mark.parametrize("name", ["tiny-gemma3", "tiny-pythia", "tiny-qwen3"])
def test_tied_embeddings_are_untied_when_trainable(name):
    model = split_library_model(tied_causal_lm(name), 2, "causal-lm")
    embedding, head = model.library_model.get_input_embeddings().weight, model.server.lm_head.weight
    assert head is not embedding and embedding.requires_grad and head.requires_grad
    assert torch.equal(head, embedding)
    assert model.library_model.get_output_embeddings() is model.server.lm_head
    assert any(p is embedding for p in model.client_parameters())
    assert any(p is head for p in model.server_parameters())
    assert_split_is_exact(model)


@pytest.mark.parametrize("name", ["tiny-gemma3", "tiny-pythia"])
def test_tied_frozen_head_stays_shared_with_lora(name):
    model = split_library_model(apply_lora(tied_causal_lm(name), LORA, "causal-lm"), 2, "causal-lm")
    embedding = model.library_model.get_input_embeddings().weight
    assert model.server.lm_head.weight is embedding and not embedding.requires_grad
    randomize_trainable(model)
    assert_split_is_exact(model)


def test_smollm_from_the_cache_gets_a_server_head_of_its_own():
    template = library_model("tiny-smollm", "causal-lm", seed=1)
    assert template.lm_head.weight is template.model.embed_tokens.weight
    first, second = build("tiny-smollm", "causal-lm"), build("tiny-smollm", "causal-lm")
    for model in (first, second):
        embedding, head = model.client.embed_tokens.weight, model.server.lm_head.weight
        assert head is not embedding and head.requires_grad and embedding.requires_grad
        assert torch.equal(head, embedding)
    with torch.no_grad():
        first.client.embed_tokens.weight.add_(1.0)
    assert not torch.equal(first.client.embed_tokens.weight, first.server.lm_head.weight)
    assert torch.equal(second.client.embed_tokens.weight, second.server.lm_head.weight)
    assert library_model("tiny-smollm", "causal-lm", seed=1).lm_head.weight.equal(second.server.lm_head.weight)

    frozen = build("tiny-smollm", "causal-lm", LORA)
    assert frozen.server.lm_head.weight is frozen.client.embed_tokens.weight
    assert not frozen.server.lm_head.weight.requires_grad


# ---------------------------------------------------------------------------------------- refused models
def test_unsupported_model_types_are_refused_in_one_line(tmp_path):
    bloom = AutoModelForCausalLM.from_config(BloomConfig(vocab_size=TINY_VOCAB_SIZE, hidden_size=32, n_layer=2, n_head=4))
    with pytest.raises(ValueError, match=rf"^cannot split 'bloom' models; supported: {SUPPORTED}$"):
        split_library_model(bloom, 1, "causal-lm")
    # A Llama layout whose model forward scales embeddings and logits: refused, not replayed wrongly,
    # also when its configuration carries a copied ``model_type: llama``.
    llama = tiny_config("tiny-llama").to_dict()
    for granite in (GraniteConfig(**{k: llama[k] for k in GRANITE_FIELDS}), GraniteConfig(**llama)):
        unsplit = AutoModelForCausalLM.from_config(granite)
        assert unsplit.model.layers and unsplit.model.rotary_emb
        with pytest.raises(ValueError, match=rf"^cannot split 'granite' models; supported: {SUPPORTED}$"):
            split_library_model(unsplit, 1, "causal-lm")
    bloom.save_pretrained(tmp_path / "bloom")
    with pytest.raises(ValueError, match=r"^cannot split 'bloom' models"):
        build_hf_split_model(str(tmp_path / "bloom"), 1, "causal-lm")


def test_a_supported_type_in_another_layout_is_refused_in_one_line():
    unsplit = library_model("tiny-llama", "causal-lm")
    unsplit.model.add_module("extra", torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match=r"^llama \(LlamaForCausalLM\) is not laid out as .*: its base model has") as raised:
        split_library_model(unsplit, 1, "causal-lm")
    assert "\n" not in str(raised.value)


def test_attention_kinds_follow_what_each_family_declares():
    assert attention_kinds(tiny_config("tiny-gemma3")) == ["sliding_attention", "full_attention", "sliding_attention"]
    assert attention_kinds(tiny_config("tiny-qwen2")) == ["full_attention", "sliding_attention", "sliding_attention"]
    assert attention_kinds(tiny_config("tiny-phi3")) == ["sliding_attention"] * 3
    assert attention_kinds(tiny_config("tiny-pythia")) == ["full_attention"] * 3
    # Keys a family does not declare are ignored, as its model forward ignores them.
    stray_llama = tiny_config("tiny-llama")
    stray_llama.sliding_window = 4
    assert attention_kinds(stray_llama) == ["full_attention"] * 3
    stray_mistral = MistralConfig(**{**tiny_config("tiny-mistral").to_dict(), "layer_types": ["full_attention"] * 3})
    assert attention_kinds(stray_mistral) == ["sliding_attention"] * 3


# ---------------------------------------------------------------------------------------- vocabulary
def test_vocab_size_overrides_a_tiny_configuration():
    assert tiny_config("tiny-pythia", vocab_size=1000).vocab_size == 1000
    assert tiny_config("tiny-pythia").vocab_size == TINY_VOCAB_SIZE
    for bad in (2, True, 300.0):
        with pytest.raises(ValueError, match="vocab_size must be an integer of at least 3"):
            tiny_config("tiny-llama", vocab_size=bad)

    wide = build_hf_split_model("tiny-smollm", 1, "causal-lm", seed=1, vocab_size=300)
    assert wide.num_classes == 300 and wide.client.embed_tokens.weight.shape == (300, 32)
    assert wide.server.lm_head.weight is not wide.client.embed_tokens.weight
    inputs = padded_batch()
    inputs["input_ids"] = torch.where(inputs["attention_mask"] == 1, inputs["input_ids"] + 150, 0)  # ids up to 277
    assert torch.allclose(wide(inputs), unsplit_logits(wide, inputs), atol=1e-5)
    assert build_hf_split_model("tiny-smollm", 1, "causal-lm", seed=1).num_classes == TINY_VOCAB_SIZE  # cache key
    encoder = build_hf_split_model("tiny-distilbert", 1, "classification", 2, vocab_size=500)
    assert encoder.client.embeddings.word_embeddings.weight.shape == (500, 32)
    verbalizer = build_hf_split_model("tiny-gpt2", 1, "verbalizer", 2, verbalizer_ids=[5, 250], vocab_size=300)
    assert verbalizer(inputs).shape == (4, 2)


def test_vocab_size_must_match_a_checkpoint(tmp_path):
    library_model("tiny-qwen3", "causal-lm").save_pretrained(tmp_path / "qwen3")
    path = str(tmp_path / "qwen3")
    assert build_hf_split_model(path, 1, "causal-lm", vocab_size=TINY_VOCAB_SIZE).num_classes == TINY_VOCAB_SIZE
    with pytest.raises(ValueError, match=rf"^vocab_size=200 only overrides tiny configurations; {path} has a vocabulary of 128$"):
        build_hf_split_model(path, 1, "causal-lm", vocab_size=200)


# ---------------------------------------------------------------------------------------- quiet loading
def test_checkpoint_loads_log_one_line_and_transformers_prints_nothing(tmp_path, caplog, capfd):
    path = tmp_path / "opt"
    library_model("tiny-opt", "causal-lm").save_pretrained(path)
    capfd.readouterr()  # save_pretrained's own progress bar
    verbosity, progress_bars = transformers_logging.get_verbosity(), transformers_logging.is_progress_bar_enabled()
    caplog.set_level(logging.INFO, logger="hosfl_flower")

    model = build_hf_split_model(str(path), 1, "classification", num_classes=3)
    build_hf_split_model(str(path), 1, "classification", num_classes=3)  # the cached template: no second line

    lines = [record.getMessage() for record in caplog.records if record.name == "hosfl_flower"]
    assert lines == [
        f"loaded checkpoint {path} (OPTForSequenceClassification); newly initialised: score.weight; "
        "unused from the checkpoint: lm_head.weight"
    ]
    assert not [record for record in caplog.records if record.name.startswith("transformers")]
    assert capfd.readouterr() == ("", "")
    assert transformers_logging.get_verbosity() == verbosity
    assert transformers_logging.is_progress_bar_enabled() == progress_bars
    assert model.server.score.weight.shape == (3, 16)  # after OPT's project_out


def test_a_classification_head_of_another_size_is_newly_initialised(tmp_path, caplog):
    path = tmp_path / "distilbert"
    library_model("tiny-distilbert", "classification", num_classes=3).save_pretrained(path)
    caplog.set_level(logging.INFO, logger="hosfl_flower")
    model = build_hf_split_model(str(path), 1, "classification", num_classes=5)
    assert model.num_classes == 5 and model.server.classifier.weight.shape == (5, 32)
    (line,) = [record.getMessage() for record in caplog.records if record.name == "hosfl_flower"]
    assert line == (
        f"loaded checkpoint {path} (DistilBertForSequenceClassification); newly initialised: "
        "classifier.bias (checkpoint shape (3,)), classifier.weight (checkpoint shape (3, 32))"
    )


def test_a_checkpoint_whose_body_does_not_fit_is_refused(tmp_path):
    path = tmp_path / "llama"
    library_model("tiny-llama", "causal-lm").save_pretrained(path)
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, "intermediate_size": 48}))
    with pytest.raises(ValueError, match=r"does not fit LlamaForCausalLM: the checkpoint's model\.layers\.0\.mlp\.down_proj"):
        build_hf_split_model(str(path), 1, "causal-lm")
