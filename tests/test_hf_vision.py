"""Split Hugging Face vision models (tiny ``from_config`` ResNet and ViT, local checkpoints)."""

import logging
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
from transformers import BertConfig, ConvNextImageProcessorPil, ViTImageProcessorPil
from transformers.utils import logging as hf_logging

from hosfl_flower.data.images import ImageSpec
from hosfl_flower.models.hf import LoraSettings
from hosfl_flower.models.hf.vision import (
    VISION_TINY_CONFIGS,
    ResNetSplit,
    ViTSplit,
    batchnorm_modules,
    build_vision_split_model,
    clear_vision_model_cache,
    default_vision_cut,
    is_vision_model,
    load_vision_model,
    split_vision_model,
    vision_config,
    vision_input_spec,
    vision_num_blocks,
)
from hosfl_flower.zo.directions import trainable_names

LORA = LoraSettings(rank=2, alpha=4.0)
NUM_CLASSES = 5
CONVNEXT_MEAN, CONVNEXT_STD = [0.1, 0.2, 0.3], [0.4, 0.5, 0.6]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models run fastest on one thread (and never contend with other processes)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def images(size: int = 32, batch: int = 4) -> torch.Tensor:
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(0))


LABELS = torch.tensor([0, 4, 1, 3])


def build(name: str, lora: LoraSettings | None = None, cut_layer: int | None = None, client_batchnorm: str = "frozen"):
    """A split model whose trainable tensors are all random (LoRA's B starts at zero otherwise)."""
    model = build_vision_split_model(name, cut_layer, NUM_CLASSES, seed=1, lora=lora, client_batchnorm=client_batchnorm)
    if lora is not None:
        generator = torch.Generator().manual_seed(2)
        with torch.no_grad():
            for param in model.parameters():
                if param.requires_grad:
                    param.copy_(0.1 * torch.randn(param.shape, generator=generator))
    return model


def module_modes(model) -> dict[str, bool]:
    return {f"{side}.{name}": m.training for side in ("client", "server") for name, m in getattr(model, side).named_modules()}


def reference_mode(model, train: bool) -> None:
    """Put the unsplit library model in the mode the split model runs in (client BatchNorm eval when frozen)."""
    expected = module_modes(model)
    model.library_model.train(train)
    if train and model.client_batchnorm == "frozen":
        for norm in batchnorm_modules(model.client):
            norm.eval()
    assert module_modes(model) == expected


def split_client_grads(model, x) -> list[torch.Tensor]:
    """First-order split step: the server returns dL/dz, the client back-propagates it."""
    smashed = model.smash({"x": x})
    z = smashed["z"].detach().requires_grad_(True)
    model.loss(model.head({"z": z}), LABELS).backward()
    model.zero_grad(set_to_none=True)  # drop the server's grads; keep only the client's from z.backward
    smashed["z"].backward(z.grad)
    grads = [p.grad.clone() for p in model.client_parameters()]
    model.zero_grad(set_to_none=True)
    return grads


def unsplit_client_grads(model, x) -> list[torch.Tensor]:
    model.loss(model.library_model(pixel_values=x).logits, LABELS).backward()
    grads = [p.grad.clone() for p in model.client_parameters()]
    model.zero_grad(set_to_none=True)
    return grads


def assert_split_is_exact(model, train: bool) -> None:
    x = images()
    model.train(train)
    logits = model({"x": x})
    reference_mode(model, train)
    assert logits.shape == (4, NUM_CLASSES)
    assert torch.allclose(logits, model.library_model(pixel_values=x).logits, atol=1e-5)
    split, unsplit = split_client_grads(model, x), unsplit_client_grads(model, x)
    assert len(split) == len(unsplit) > 0
    assert any(float(g.abs().max()) > 0 for g in split)
    for a, b in zip(split, unsplit):
        assert torch.allclose(a, b, atol=1e-6, rtol=1e-4)


# ---------------------------------------------------------------------------------------- split exactness
@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("lora", [None, LORA], ids=["full", "lora"])
@pytest.mark.parametrize("name", ["tiny-resnet", "tiny-vit"])
def test_split_equals_unsplit_forward_and_client_gradient(name, lora, train):
    model = build(name, lora)
    assert model.num_classes == NUM_CLASSES and model.cut_layer == default_vision_cut(model.config)
    assert_split_is_exact(model, train)


@pytest.mark.parametrize("lora", [None, LORA], ids=["full", "lora"])
def test_resnet_with_trainable_client_batchnorm_splits_exactly(lora):
    model = build("tiny-resnet", lora, client_batchnorm="train")
    assert_split_is_exact(model, train=True)
    assert_split_is_exact(model, train=False)


@pytest.mark.parametrize("client_batchnorm", ["frozen", "train"])
def test_every_resnet_cut_layer_splits_exactly(client_batchnorm):
    for cut in (1, 2, 3):
        model = build("tiny-resnet", cut_layer=cut, client_batchnorm=client_batchnorm)
        assert isinstance(model, ResNetSplit)
        assert len(model.client.stages) == cut and len(model.server.stages) == 4 - cut
        assert_split_is_exact(model, train=True)


def test_segments_share_the_library_modules():
    model = build("tiny-vit", cut_layer=2)
    library = model.library_model
    assert model.client.embeddings is library.vit.embeddings
    assert list(model.client.layers) == list(library.vit.layers[:2]) and list(model.server.layers) == [library.vit.layers[2]]
    assert model.server.classifier is library.classifier
    assert model.smash({"x": images()})["z"].shape == (4, 17, 32)  # CLS + 4x4 patches
    resnet = build("tiny-resnet")
    assert resnet.client.embedder is resnet.library_model.resnet.embedder
    assert resnet.smash({"x": images()})["z"].shape == (4, 16, 4, 4)
    assert not any(n.startswith("library_model") for n in model.state_dict())


def test_vit_needs_the_configured_size_unless_it_interpolates():
    model = build("tiny-vit")
    x = images(48)
    with pytest.raises(ValueError, match=r"Input image size \(48\*48\) doesn't match model \(32\*32\)"):
        model.smash({"x": x})
    interpolating = ViTSplit(model.library_model, 1, interpolate_pos_encoding=True).eval()
    reference = model.library_model(pixel_values=x, interpolate_pos_encoding=True).logits
    assert torch.allclose(interpolating({"x": x}), reference, atol=1e-5)


# ---------------------------------------------------------------------------------------- client BatchNorm
def test_frozen_client_batchnorm_stays_in_eval_with_fixed_affine_parameters():
    model = build("tiny-resnet")
    client_norms, server_norms = batchnorm_modules(model.client), batchnorm_modules(model.server)
    assert len(client_norms) == 1 + 2 + 3 and server_norms  # stem; two convs per stage, a shortcut from stage 2 on
    frozen = {id(p) for norm in client_norms for p in norm.parameters()}
    assert frozen and not frozen & {id(p) for p in model.client_parameters()}
    assert model.client_parameters() and not any("normalization" in n for n in trainable_names(model.client))
    assert all(p.requires_grad for norm in server_norms for p in norm.parameters())
    model.train()
    assert model.training and model.client.training and not any(norm.training for norm in client_norms)
    model.client.train()
    assert not any(norm.training for norm in client_norms)
    assert all(norm.training for norm in server_norms)
    before = {k: v.clone() for k, v in model.client.state_dict().items()}
    server_before = {k: v.clone() for k, v in model.server.state_dict().items() if "running_" in k}
    model({"x": images()}).sum().backward()
    assert all(torch.equal(before[k], v) for k, v in model.client.state_dict().items())
    assert all(p.grad is None for norm in client_norms for p in norm.parameters())
    assert all(not torch.equal(server_before[k], model.server.state_dict()[k]) for k in server_before)
    assert all(p.grad is not None for norm in server_norms for p in norm.parameters())
    model.eval()
    assert not any(m.training for m in model.modules())


def test_trainable_client_batchnorm_trains_normally():
    model = build("tiny-resnet", client_batchnorm="train")
    client_norms = batchnorm_modules(model.client)
    trainable = {id(p) for p in model.client_parameters()}
    assert all(id(p) in trainable for norm in client_norms for p in norm.parameters())
    model.train()
    assert all(norm.training for norm in client_norms)
    running = client_norms[0].running_mean.clone()
    model({"x": images()})
    assert not torch.equal(running, client_norms[0].running_mean)


def test_lora_client_trains_exactly_its_lora_parameters():
    for name, per_block in (("tiny-vit", 4), ("tiny-resnet", None)):
        model = build(name, LORA)
        names = trainable_names(model.client)
        assert names == [n for n, _ in model.client.named_parameters() if "lora_" in n] and names
        if per_block:
            assert len(names) == per_block * model.cut_layer  # lora_A and lora_B of q_proj and v_proj
        server = trainable_names(model.server)
        assert all("lora_" in n or n.startswith("classifier.") for n in server)
        assert any(n.startswith("classifier.") for n in server), "the new classification head must train"


def test_lora_targets_outside_the_client_are_refused():
    with pytest.raises(ValueError, match="no module of the client"):
        build_vision_split_model("tiny-vit", 1, lora=LoraSettings(rank=2, targets=("classifier",)))


# ---------------------------------------------------------------------------------------- seeds and cache
def full_state(model) -> dict[str, torch.Tensor]:
    return {**{f"client.{k}": v for k, v in model.client.state_dict().items()}, **model.server.state_dict()}


@pytest.mark.parametrize("lora", [None, LORA], ids=["full", "lora"])
@pytest.mark.parametrize("name", ["tiny-resnet", "tiny-vit"])
def test_weights_depend_on_the_seed_alone(name, lora):
    first = build_vision_split_model(name, None, NUM_CLASSES, seed=3, lora=lora)
    torch.manual_seed(123)  # the global generator does not matter
    clear_vision_model_cache()
    second = build_vision_split_model(name, None, NUM_CLASSES, seed=3, lora=lora)
    other = build_vision_split_model(name, None, NUM_CLASSES, seed=4, lora=lora)
    a, b, c = full_state(first), full_state(second), full_state(other)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    head = [k for k in a if k.startswith("classifier.") and k.endswith("weight")]
    assert head and not any(torch.equal(a[k], c[k]) for k in head)


def test_cached_copies_share_frozen_weights_and_copy_trainable_ones():
    first, second = build("tiny-vit", LORA), build("tiny-vit", LORA)
    frozen = [(p, q) for p, q in zip(first.parameters(), second.parameters()) if not p.requires_grad]
    trainable = [(p, q) for p, q in zip(first.parameters(), second.parameters()) if p.requires_grad]
    assert frozen and all(p is q for p, q in frozen)
    assert trainable and all(p is not q for p, q in trainable)
    with torch.no_grad():
        first.server.classifier.weight.add_(1.0)
    assert not torch.equal(first.server.classifier.weight, second.server.classifier.weight)


def test_default_cuts_and_block_counts():
    resnet, vit = vision_config("tiny-resnet"), vision_config("tiny-vit")
    assert (vision_num_blocks(resnet), default_vision_cut(resnet)) == (4, 2)
    assert (vision_num_blocks(vit), default_vision_cut(vit)) == (3, 1)
    assert set(VISION_TINY_CONFIGS) == {"tiny-resnet", "tiny-vit"}


# ---------------------------------------------------------------------------------------- checkpoints
@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """A tiny ResNet with 1000 labels and a ConvNeXt-style processor, a ViT with a ViT processor, a ResNet
    without a processor, and a text (BERT) configuration."""
    root = tmp_path_factory.mktemp("vision")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        resnet = load_vision_model("tiny-resnet", 1000)
        vit = load_vision_model("tiny-vit", 1000)
    quiet = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    resnet.save_pretrained(root / "resnet")
    ConvNextImageProcessorPil(size={"shortest_edge": 64}, image_mean=CONVNEXT_MEAN, image_std=CONVNEXT_STD).save_pretrained(
        root / "resnet"
    )
    resnet.save_pretrained(root / "resnet-bare")
    vit.save_pretrained(root / "vit")
    ViTImageProcessorPil(size={"height": 32, "width": 32}).save_pretrained(root / "vit")
    BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32).save_pretrained(
        root / "bert"
    )
    hf_logging.enable_progress_bar()
    hf_logging.set_verbosity(quiet)
    return {"root": root, "resnet_weights": resnet.state_dict(), "vit_weights": vit.state_dict()}


def test_local_checkpoint_gets_a_new_head_and_one_quiet_log_line(checkpoints, caplog, capfd):
    path = str(checkpoints["root"] / "resnet")
    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    clear_vision_model_cache()
    capfd.readouterr()
    with caplog.at_level(logging.INFO, logger="hosfl_flower"):
        model = build_vision_split_model(path, None, 10, seed=0)
    out, err = capfd.readouterr()
    assert (out, err) == ("", "")
    records = [r for r in caplog.records if r.name == "hosfl_flower"]
    assert len(records) == 1 and records[0].levelno == logging.INFO
    message = records[0].getMessage()
    assert path in message and "classifier.1.weight" in message and "classifier.1.bias" in message
    assert (hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()) == (verbosity, bars)
    assert model.num_classes == 10 and model.cut_layer == 2
    assert model.server.classifier[1].weight.shape == (10, 64)
    saved = checkpoints["resnet_weights"]
    loaded = model.library_model.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in saved.items() if not k.startswith("classifier."))
    assert_split_is_exact(build_vision_split_model(path, 1, NUM_CLASSES, seed=0), train=True)
    other_seed = build_vision_split_model(path, None, 10, seed=1)
    assert not torch.equal(other_seed.server.classifier[1].weight, model.server.classifier[1].weight)


def test_local_checkpoint_with_its_own_class_count_initialises_nothing(checkpoints, caplog):
    clear_vision_model_cache()
    with caplog.at_level(logging.INFO, logger="hosfl_flower"):
        model = build_vision_split_model(str(checkpoints["root"] / "vit"), 2, 1000, seed=0)
    assert "newly initialised: nothing" in caplog.records[-1].getMessage()
    assert torch.equal(model.server.classifier.weight, checkpoints["vit_weights"]["classifier.weight"])


def test_input_specs(checkpoints):
    root = checkpoints["root"]
    assert vision_input_spec("tiny-resnet") == ImageSpec(32, 3, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    assert vision_input_spec("tiny-vit") == ImageSpec(32, 3, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    spec = vision_input_spec(str(root / "resnet"))
    assert spec.image_size == 64 and spec.num_channels == 3
    assert spec.mean == pytest.approx(CONVNEXT_MEAN) and spec.std == pytest.approx(CONVNEXT_STD)
    assert vision_input_spec(str(root / "vit")) == ImageSpec(32, 3, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    bare = vision_input_spec(str(root / "resnet-bare"))
    assert bare == ImageSpec(224, 3, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


def test_is_vision_model(checkpoints):
    root = checkpoints["root"]
    assert is_vision_model("tiny-resnet") and is_vision_model("tiny-vit")
    assert is_vision_model(str(root / "resnet")) and is_vision_model(str(root / "vit"))
    assert not is_vision_model(str(root / "bert"))
    assert not is_vision_model("tiny-gpt2")
    assert not is_vision_model(str(root / "missing"))


# ---------------------------------------------------------------------------------------- errors
def assert_one_line_error(call, match: str) -> None:
    with pytest.raises(ValueError, match=match) as error:
        call()
    assert "\n" not in str(error.value)


def test_bad_settings_raise_one_line_errors(checkpoints):
    for bad in (0, 4, -1):
        assert_one_line_error(lambda: build_vision_split_model("tiny-resnet", bad), rf"cut-layer {bad} is outside 1\.\.3")
    assert_one_line_error(lambda: build_vision_split_model("tiny-vit", 3), r"cut-layer 3 is outside 1\.\.2")
    assert_one_line_error(
        lambda: build_vision_split_model("tiny-resnet", 2, client_batchnorm="learn"),
        "client_batchnorm 'learn' is not one of frozen, train",
    )
    bert = str(checkpoints["root"] / "bert")
    assert_one_line_error(lambda: build_vision_split_model(bert, 1), "cannot split 'bert' vision models; supported: resnet, vit")
    library = build("tiny-vit").library_model
    assert_one_line_error(lambda: ResNetSplit(library, 1, client_batchnorm="off"), "client_batchnorm 'off'")
    library.config.model_type = "deit"
    assert_one_line_error(lambda: split_vision_model(library, 1), "cannot split 'deit' vision models; supported: resnet, vit")
