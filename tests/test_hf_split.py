"""Split Hugging Face transformers (tiny ``from_config`` models) and the offline text task."""

import pytest
import torch
import torch.nn.functional as F
from transformers import GPT2Config, GPT2LMHeadModel

from hosfl_flower.data.examples import sample_batch
from hosfl_flower.data.text import (
    load_text_task,
    sentiment_reviews,
    sentiment_task,
    sentiment_tokenizer,
    text_examples,
)
from hosfl_flower.models.hf import (
    DEFAULT_LORA_TARGETS,
    TINY_CONFIGS,
    TINY_VOCAB_SIZE,
    LoraSettings,
    apply_lora,
    build_hf_split_model,
    library_model,
    split_library_model,
)
from hosfl_flower.zo.directions import trainable_names

FAMILIES = [
    "tiny-gpt2",
    "tiny-opt",
    "tiny-llama",
    "tiny-smollm",
    "tiny-qwen2",
    "tiny-qwen3",
    "tiny-mistral",
    "tiny-phi3",
    "tiny-gemma",
    "tiny-gemma3",
    "tiny-pythia",
    "tiny-bert",
    "tiny-roberta",
    "tiny-distilbert",
]
ENCODERS = ["tiny-bert", "tiny-roberta", "tiny-distilbert"]
DECODERS = [name for name in FAMILIES if name not in ENCODERS]
CLASSIFIER_PREFIXES = ("score.", "pre_classifier.", "classifier.")
LORA = LoraSettings(rank=4, alpha=8.0)
VERBALIZER_IDS = [5, 9, 17]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models run fastest on one thread (and never contend with other processes)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def padded_batch(padding: str = "right") -> dict[str, torch.Tensor]:
    """Four rows of random tokens, three of them padded (pad id 0) on the given side."""
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(3, TINY_VOCAB_SIZE, (4, 12), generator=generator)
    attention_mask = torch.ones_like(input_ids)
    for row, length in enumerate([12, 9, 4, 11]):
        pad = slice(length, None) if padding == "right" else slice(0, 12 - length)
        input_ids[row, pad] = 0
        attention_mask[row, pad] = 0
    return {"input_ids": input_ids, "attention_mask": attention_mask}


def build(name: str, task: str = "classification", lora: LoraSettings | None = None, cut_layer: int = 2):
    """A split model whose trainable tensors are all random (LoRA's B starts at zero otherwise)."""
    num_classes = len(VERBALIZER_IDS) if task == "verbalizer" else 3
    model = build_hf_split_model(
        name,
        cut_layer,
        task,
        num_classes,
        seed=1,
        lora=lora,
        verbalizer_ids=VERBALIZER_IDS if task == "verbalizer" else None,
    )
    if lora is not None:
        generator = torch.Generator().manual_seed(2)
        with torch.no_grad():
            for param in model.parameters():
                if param.requires_grad:
                    param.copy_(0.1 * torch.randn(param.shape, generator=generator))
    return model


def unsplit_logits(model, inputs) -> torch.Tensor:
    """The library model's own forward; for the verbalizer, its LM logits at the rightmost non-pad token."""
    logits = model.library_model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).logits
    if model.task == "verbalizer":
        not_pad = (inputs["input_ids"] != 0).long()
        last = (torch.arange(not_pad.shape[1]) * not_pad).argmax(-1)
        return logits[torch.arange(logits.shape[0]), last][:, model.verbalizer_ids]
    return logits


def labels_for(model, inputs) -> torch.Tensor:
    if model.task == "causal-lm":
        return inputs["input_ids"].masked_fill(inputs["attention_mask"] == 0, -100)
    return torch.tensor([0, 2, 1, 1]) % model.num_classes


def split_client_grads(model, inputs, labels) -> list[torch.Tensor]:
    """First-order split step: the server returns dL/dz, the client back-propagates it."""
    smashed = model.smash(inputs)
    z = smashed["z"].detach().requires_grad_(True)
    model.loss(model.head({**smashed, "z": z}), labels).backward()
    model.zero_grad(set_to_none=True)  # drop the server's grads; keep only the client's from z.backward
    smashed["z"].backward(z.grad)
    grads = [p.grad.clone() for p in model.client_parameters()]
    model.zero_grad(set_to_none=True)
    return grads


def unsplit_client_grads(model, inputs, labels) -> list[torch.Tensor]:
    logits = unsplit_logits(model, inputs)
    loss = model.loss(logits, labels)
    loss.backward()
    grads = [p.grad.clone() for p in model.client_parameters()]
    model.zero_grad(set_to_none=True)
    return grads


def assert_split_is_exact(model, padding: str = "right") -> None:
    inputs = padded_batch(padding)
    smashed = model.smash(inputs)
    assert smashed["z"].dtype == torch.float32 and smashed["z"].shape[:2] == (4, 12)
    assert torch.equal(smashed["attention_mask"], inputs["attention_mask"])
    assert torch.allclose(model.head(smashed), unsplit_logits(model, inputs), atol=1e-5)
    labels = labels_for(model, inputs)
    split, unsplit = split_client_grads(model, inputs, labels), unsplit_client_grads(model, inputs, labels)
    assert len(split) == len(unsplit) > 0
    assert any(float(g.abs().max()) > 0 for g in split)
    for a, b in zip(split, unsplit):
        assert torch.allclose(a, b, atol=1e-6, rtol=1e-4)


# ---------------------------------------------------------------------------------------- split exactness
@pytest.mark.parametrize("lora", [None, LORA], ids=["full", "lora"])
@pytest.mark.parametrize("name", FAMILIES)
def test_classification_split_equals_unsplit_forward_and_client_gradient(name, lora):
    model = build(name, lora=lora)
    assert model.num_classes == 3
    assert_split_is_exact(model, "right")
    if name in DECODERS:
        assert set(model.smash(padded_batch())) == {"z", "attention_mask", "position_ids"}
        assert_split_is_exact(model, "left")


@pytest.mark.parametrize("task", ["causal-lm", "verbalizer"])
@pytest.mark.parametrize("lora", [None, LORA], ids=["full", "lora"])
@pytest.mark.parametrize("name", DECODERS)
def test_lm_tasks_split_exactly(name, lora, task):
    model = build(name, task, lora)
    assert model.num_classes == (TINY_VOCAB_SIZE if task == "causal-lm" else len(VERBALIZER_IDS))
    assert_split_is_exact(model)


def test_causal_lm_loss_is_the_library_shifted_loss():
    model = build("tiny-llama", "causal-lm")
    inputs = padded_batch()
    labels = labels_for(model, inputs)
    reference = model.library_model(**inputs, labels=labels).loss
    assert torch.allclose(model.loss(model(inputs), labels), reference, atol=1e-6)
    shifted = F.cross_entropy(model(inputs)[:, :-1].reshape(-1, TINY_VOCAB_SIZE), labels[:, 1:].reshape(-1))
    assert torch.allclose(reference, shifted, atol=1e-6)


@pytest.mark.parametrize("name", ["tiny-gpt2", "tiny-llama", "tiny-gemma3", "tiny-distilbert"])
def test_every_cut_layer_splits_exactly(name):
    blocks = {"tiny-gpt2": "h", "tiny-distilbert": "layer"}.get(name, "layers")
    for cut in (1, 2):
        inputs = padded_batch()
        model = build(name, cut_layer=cut)
        assert len(model.client[blocks]) == cut
        assert torch.allclose(model(inputs), unsplit_logits(model, inputs), atol=1e-5)


# ---------------------------------------------------------------------------------------- trainable sets
@pytest.mark.parametrize("name", FAMILIES)
def test_lora_client_trains_exactly_its_lora_parameters(name):
    model = build(name, lora=LORA)
    names = trainable_names(model.client)
    lora_names = [n for n, _ in model.client.named_parameters() if "lora_" in n]
    targets_per_block = len(DEFAULT_LORA_TARGETS[model.config.model_type])  # c_attn, qkv_proj, or q and v
    assert names == lora_names and len(names) == 2 * targets_per_block * model.cut_layer  # lora_A and lora_B
    server = trainable_names(model.server)
    assert server and all("lora_" in n or n.startswith(CLASSIFIER_PREFIXES) for n in server)
    assert any(n.startswith(CLASSIFIER_PREFIXES) for n in server), "the new classification head must train"
    full = build(name)
    assert trainable_names(full.client) == [n for n, _ in full.client.named_parameters()]


def test_lora_targets_outside_the_client_are_refused():
    with pytest.raises(ValueError, match="no module of the client"):
        build_hf_split_model("tiny-llama", 1, lora=LoraSettings(rank=2, targets=("score",)))


@pytest.mark.parametrize("name", ["tiny-gpt2", "tiny-qwen2", "tiny-gemma3", "tiny-pythia", "tiny-bert", "tiny-distilbert"])
def test_cut_layer_out_of_range_raises(name):
    for bad in (0, 3, -1):
        with pytest.raises(ValueError, match=rf"cut-layer {bad} is outside 1\.\.2"):
            build_hf_split_model(name, bad)


def test_unknown_names_tasks_and_bad_verbalizers_raise():
    with pytest.raises(ValueError, match="task 'causal-lm' is not available for bert"):
        build_hf_split_model("tiny-bert", 1, "causal-lm")
    with pytest.raises(ValueError, match="task 'verbalizer' is not available for distilbert"):
        build_hf_split_model("tiny-distilbert", 1, "verbalizer", 2, verbalizer_ids=[4, 5])
    with pytest.raises(ValueError, match="needs 2 verbalizer ids"):
        build_hf_split_model("tiny-gpt2", 1, "verbalizer", 2, verbalizer_ids=[4])
    with pytest.raises(ValueError, match="token ids in 0..127"):
        build_hf_split_model("tiny-gpt2", 1, "verbalizer", 2, verbalizer_ids=[4, 500])


def test_tied_lm_head_is_untied_when_trainable_and_shared_when_frozen():
    def tied_gpt2() -> GPT2LMHeadModel:
        config = GPT2Config(**{**TINY_CONFIGS["tiny-gpt2"]().to_dict(), "tie_word_embeddings": True})
        return GPT2LMHeadModel(config).eval()

    tied = tied_gpt2()
    assert tied.lm_head.weight is tied.transformer.wte.weight
    model = split_library_model(tied, 1, "causal-lm")
    assert model.server.lm_head.weight is not model.client.wte.weight
    assert torch.equal(model.server.lm_head.weight, model.client.wte.weight)
    assert torch.allclose(model(padded_batch()), unsplit_logits(model, padded_batch()), atol=1e-5)

    frozen = apply_lora(tied_gpt2(), LORA, "causal-lm")
    model = split_library_model(frozen, 1, "causal-lm")
    assert model.server.lm_head.weight is model.client.wte.weight and not model.client.wte.weight.requires_grad


# ---------------------------------------------------------------------------------------- building and caching
def test_same_seed_same_weights_and_the_cache_shares_only_frozen_tensors():
    a, b, c = (build_hf_split_model("tiny-llama", 1, seed=s, lora=LORA) for s in (5, 5, 6))
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(x, y), name
        assert (x.data_ptr() == y.data_ptr()) == ("lora_" not in name and "score" not in name), name
    assert not torch.equal(a.server.score.weight, c.server.score.weight)
    with torch.no_grad():
        a.client_parameters()[0].add_(1.0)
    assert not torch.equal(a.client_parameters()[0], b.client_parameters()[0])
    full_a, full_b = build_hf_split_model("tiny-llama", 1, seed=5), build_hf_split_model("tiny-llama", 1, seed=5)
    assert full_a.client.embed_tokens.weight is not full_b.client.embed_tokens.weight


def test_from_pretrained_local_directory(tmp_path):
    reference = library_model("tiny-qwen2", "classification", num_classes=3, seed=4)
    reference.save_pretrained(tmp_path / "tiny-qwen2")
    model = build_hf_split_model(str(tmp_path / "tiny-qwen2"), 2, "classification", num_classes=3, seed=0, lora=LORA)
    inputs = padded_batch()
    expected = reference(**inputs).logits
    assert torch.allclose(model(inputs), expected, atol=1e-5), "LoRA starts as the identity"
    assert isinstance(model.library_model, type(reference))
    assert trainable_names(model.client) == [n for n, _ in model.client.named_parameters() if "lora_" in n]
    with pytest.raises(ValueError, match="cut-layer 3"):
        build_hf_split_model(str(tmp_path / "tiny-qwen2"), 3, "classification", num_classes=3)


# ---------------------------------------------------------------------------------------- text task
def test_offline_sentiment_task_is_deterministic_padded_and_balanced():
    task = sentiment_task(num_examples=400, seed=3, max_length=24)
    assert set(task.dataset.column_names) == {"input_ids", "attention_mask", "label"}
    examples = text_examples(task.dataset)
    ids, mask = examples.inputs["input_ids"], examples.inputs["attention_mask"]
    assert torch.equal(ids, text_examples(sentiment_task(400, 3, 24).dataset).inputs["input_ids"])
    assert not torch.equal(ids, text_examples(sentiment_task(400, 4, 24).dataset).inputs["input_ids"])
    assert ids.shape == mask.shape == (400, 24) and ids.dtype == mask.dtype == torch.int64
    assert examples.labels.shape == (400,) and 0.4 < examples.labels.float().mean() < 0.6
    assert torch.equal(ids == task.pad_id, mask == 0) and int(mask.sum(1).max()) <= 20
    assert (ids[:, 0] == task.tokenizer.bos_token_id).all() and not (ids == task.tokenizer.unk_token_id).any()
    assert task.num_classes == 2 and task.pad_id == 0 and task.vocab_size <= TINY_VOCAB_SIZE
    assert [task.tokenizer.decode([i]) for i in task.verbalizer_ids] == ["bad", "good"]
    lm = text_examples(task.dataset, "causal-lm")
    assert torch.equal(lm.labels, ids.masked_fill(mask == 0, -100))


def test_load_text_task_from_local_files_with_a_saved_tokenizer(tmp_path):
    reviews = sentiment_reviews(30, seed=1)
    reviews.to_csv(tmp_path / "reviews.csv")
    sentiment_tokenizer().save_pretrained(tmp_path / "tokenizer")
    task = load_text_task(
        "csv",
        str(tmp_path / "tokenizer"),
        max_length=16,
        data_files=str(tmp_path / "reviews.csv"),
        template="{text} !",
        label_words=("bad", "good"),
    )
    assert task.num_classes == 2 and len(task.dataset) == 30 and task.max_length == 16
    assert task.verbalizer_ids == sentiment_task(10).verbalizer_ids
    examples = text_examples(task.dataset)
    assert examples.inputs["input_ids"].shape == (30, 16)
    assert examples.labels.tolist() == reviews[:]["label"]
    expected = sentiment_tokenizer()(reviews[0]["text"] + " !")["input_ids"][:16]
    assert examples.inputs["input_ids"][0, : len(expected)].tolist() == expected
    assert task.tokenizer.unk_token_id in examples.inputs["input_ids"][0].tolist(), "'!' is not in the vocabulary"


def test_verbalizer_model_reads_the_text_task():
    task = sentiment_task(num_examples=8, seed=0)
    model = build_hf_split_model("tiny-gpt2", 1, "verbalizer", task.num_classes, verbalizer_ids=task.verbalizer_ids)
    examples = text_examples(task.dataset)
    logits = model(examples.inputs)
    assert logits.shape == (8, 2)
    full = unsplit_logits(model, examples.inputs)
    assert torch.allclose(logits, full, atol=1e-5)


def test_tiny_transformer_learns_the_offline_task_with_split_first_order_steps():
    examples = text_examples(sentiment_task(num_examples=1000, seed=0).dataset)
    train, test = examples.take(torch.arange(800)), examples.take(torch.arange(800, 1000))
    model = build_hf_split_model("tiny-llama", 1, "classification", num_classes=2, seed=0).train()
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    for step in range(80):
        batch = sample_batch(train, 64, 0, step)
        optimizer.zero_grad()
        smashed = model.smash(batch.inputs)
        z = smashed["z"].detach().requires_grad_(True)
        model.loss(model.head({**smashed, "z": z}), batch.labels).backward()  # server
        smashed["z"].backward(z.grad)  # client
        optimizer.step()
    with torch.no_grad():
        accuracy = (model.eval()(test.inputs).argmax(-1) == test.labels).float().mean().item()
    assert accuracy > 0.75, f"held-out accuracy {accuracy:.3f} (chance 0.5, word counts 0.66)"
