"""Hugging Face image classifiers (ResNet, ViT) cut after a stage or an encoder layer.

The split model shares (does not copy) the modules of an unsplit ``*ForImageClassification`` model
(optionally with ``peft`` LoRA adapters) and replays that model's own forward, cut in two. The input
key is ``"x"``: float images ``(B, C, H, W)``, already resized and normalised as
:func:`vision_input_spec` describes.

Client BatchNorm layers are frozen by default: they stay in eval mode (running statistics, no
updates) whatever ``train()`` is called on, and their affine parameters are not trainable.

Per-process cache: :func:`vision_library_model` keeps one template per ``(name_or_path, num_classes,
seed, lora)`` and hands out deep copies sharing every frozen parameter with it, as
:func:`~hosfl_flower.models.hf.build.library_model` does for text models.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import replace
from functools import lru_cache
from typing import Any, cast

import torch
from torch import nn
from transformers import (
    AutoConfig,
    AutoImageProcessor,
    AutoModelForImageClassification,
    PretrainedConfig,
    PreTrainedModel,
    ResNetConfig,
    ViTConfig,
)
from transformers.masking_utils import create_bidirectional_mask
from transformers.utils import cached_file

from ...data.images import ImageSpec
from ...zo.directions import trainable_parameters
from ..base import Inputs, Smashed, SplitModel
from .build import LoraSettings, apply_lora, copy_sharing_frozen, quiet_transformers
from .configs import TINY_CONFIGS

LOG = logging.getLogger("hosfl_flower")

TINY_IMAGE_SIZE = 32
"""Image side of the tiny vision models (3 channels, normalised with mean 0.5 and std 0.5)."""


def _tiny_resnet() -> PretrainedConfig:
    return ResNetConfig(num_channels=3, embedding_size=8, hidden_sizes=[8, 16, 32, 64], depths=[1, 1, 1, 1], layer_type="basic")


def _tiny_vit() -> PretrainedConfig:
    return ViTConfig(
        image_size=TINY_IMAGE_SIZE,
        patch_size=8,
        num_channels=3,
        hidden_size=32,
        num_hidden_layers=3,
        num_attention_heads=4,
        intermediate_size=64,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )


VISION_TINY_CONFIGS: dict[str, Callable[[], PretrainedConfig]] = {"tiny-resnet": _tiny_resnet, "tiny-vit": _tiny_vit}
"""Named tiny vision configurations (built ``from_config``, weights from the seed)."""

VISION_LORA_TARGETS: dict[str, tuple[str, ...]] = {"resnet": ("convolution",), "vit": ("q_proj", "v_proj")}
"""LoRA target module names per ``model_type`` when :class:`LoraSettings` names none."""

CLIENT_BATCHNORM_MODES = ("frozen", "train")
"""``frozen``: client BatchNorm in eval mode with fixed affine parameters; ``train``: ordinary BatchNorm."""

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

DEFAULT_RESNET_CUT = 2
"""The ResNet family's default cut: stem and the first two stages on the client (see :class:`ResNetSplit`)."""

_BATCHNORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)


# ---------------------------------------------------------------------------------------- configs
def vision_num_blocks(config: PretrainedConfig) -> int:
    """The cuttable blocks of a vision model: ResNet stages or ViT encoder layers."""
    if config.model_type == "resnet":
        return min(len(config.hidden_sizes), len(config.depths))
    if config.model_type == "vit":
        return int(config.num_hidden_layers)
    raise ValueError(_unsupported(config.model_type))


def default_vision_cut(config: PretrainedConfig) -> int:
    """The default cut layer: 2 for ResNet (the official HO-SFL ResNet-18 cut), half the layers for ViT."""
    num_blocks = vision_num_blocks(config)
    if config.model_type == "resnet":
        return max(1, min(DEFAULT_RESNET_CUT, num_blocks - 1))
    return max(1, num_blocks // 2)


def _unsupported(model_type: str) -> str:
    return f"cannot split {model_type!r} vision models; supported: {', '.join(sorted(VISION_SPLIT_FAMILIES))}"


def _cut_error(cut_layer: int, model_type: str, num_blocks: int) -> str:
    return f"cut-layer {cut_layer} is outside 1..{num_blocks - 1} ({model_type} with {num_blocks} blocks)"


def _check_cut(config: PretrainedConfig, cut_layer: int) -> None:
    num_blocks = vision_num_blocks(config)
    if not 1 <= cut_layer < num_blocks:
        raise ValueError(_cut_error(cut_layer, config.model_type, num_blocks))


def _check_client_batchnorm(mode: str) -> None:
    if mode not in CLIENT_BATCHNORM_MODES:
        raise ValueError(f"client_batchnorm {mode!r} is not one of {', '.join(CLIENT_BATCHNORM_MODES)}")


def vision_config(name_or_path: str) -> PretrainedConfig:
    """The configuration of a tiny name, a hub name or a local directory (no weights are read)."""
    if name_or_path in VISION_TINY_CONFIGS:
        return VISION_TINY_CONFIGS[name_or_path]()
    with quiet_transformers():
        return AutoConfig.from_pretrained(name_or_path)


@lru_cache(maxsize=16)
def _family(name_or_path: str) -> tuple[str, int, int]:
    """``(model_type, blocks, default cut)`` of a vision model; blocks and cut are 0 for other model types."""
    config = vision_config(name_or_path)
    if config.model_type not in VISION_SPLIT_FAMILIES:
        return config.model_type, 0, 0
    return config.model_type, vision_num_blocks(config), default_vision_cut(config)


def is_vision_model(name_or_path: str) -> bool:
    """Whether ``name_or_path`` is a tiny vision name or a checkpoint whose ``model_type`` can be split here.

    Reads the configuration only; a name that cannot be resolved (unreachable hub) gives ``False``.
    """
    if name_or_path in VISION_TINY_CONFIGS:
        return True
    if name_or_path in TINY_CONFIGS:
        return False
    try:
        config = vision_config(name_or_path)
    except Exception:  # any resolution failure (missing files, offline hub, unknown model type) means "no"
        return False
    return config.model_type in VISION_SPLIT_FAMILIES


def _per_channel(values: Any, num_channels: int) -> tuple[float, ...]:
    """A scalar or per-channel statistic as one float per channel."""
    if isinstance(values, (int, float)):
        values = [values]
    floats = tuple(float(v) for v in values)
    return floats * num_channels if len(floats) == 1 else floats


def _config_image_size(config: PretrainedConfig) -> int:
    size = getattr(config, "image_size", None) or 224
    return int(size[0] if isinstance(size, (list, tuple)) else size)


def vision_input_spec(name_or_path: str) -> ImageSpec:
    """Input size, channels and normalisation of a vision model.

    Tiny models: 32 pixels, 3 channels, mean 0.5, std 0.5. A checkpoint with a
    ``preprocessor_config.json``: its image processor's final size (the center crop when it crops,
    else ``shortest_edge`` or ``height``) and ``image_mean`` / ``image_std``; without one, the
    configuration's ``image_size`` (224 when absent) and ImageNet statistics.
    """
    if name_or_path in VISION_TINY_CONFIGS:
        config = VISION_TINY_CONFIGS[name_or_path]()
        return ImageSpec(TINY_IMAGE_SIZE, config.num_channels, (0.5,) * config.num_channels, (0.5,) * config.num_channels)
    config = vision_config(name_or_path)
    num_channels = int(getattr(config, "num_channels", 3))
    with quiet_transformers():
        has_processor = cached_file(name_or_path, "preprocessor_config.json", _raise_exceptions_for_missing_entries=False)
        processor = AutoImageProcessor.from_pretrained(name_or_path) if has_processor else None
    if processor is None:
        return ImageSpec(
            _config_image_size(config),
            num_channels,
            _per_channel(IMAGENET_MEAN, num_channels),
            _per_channel(IMAGENET_STD, num_channels),
        )
    size = getattr(processor, "size", None) or {}
    crop = getattr(processor, "crop_size", None) or {}
    crop_height = crop.get("height") if getattr(processor, "do_center_crop", False) else None
    image_size = int(crop_height or size.get("shortest_edge") or size.get("height") or _config_image_size(config))
    if getattr(processor, "do_normalize", True):
        mean = _per_channel(getattr(processor, "image_mean", IMAGENET_MEAN), num_channels)
        std = _per_channel(getattr(processor, "image_std", IMAGENET_STD), num_channels)
    else:
        mean, std = (0.0,) * num_channels, (1.0,) * num_channels
    return ImageSpec(image_size, num_channels, mean, std)


# ---------------------------------------------------------------------------------------- loading
def load_vision_model(name_or_path: str, num_classes: int) -> PreTrainedModel:
    """The unsplit float32 image classifier: a tiny name (``from_config``) or ``from_pretrained``.

    A checkpoint whose head has another class count gets a new, randomly initialised head. The load
    is silent except for one INFO line on the ``hosfl_flower`` logger naming the checkpoint and the
    newly initialised weights.
    """
    if name_or_path in VISION_TINY_CONFIGS:
        config = VISION_TINY_CONFIGS[name_or_path]()
        config.num_labels = num_classes
        model = AutoModelForImageClassification.from_config(config, dtype=torch.float32)
        LOG.info("built %s (%s) from its tiny configuration, %d classes", name_or_path, type(model).__name__, num_classes)
        return model
    with quiet_transformers():
        model, info = AutoModelForImageClassification.from_pretrained(
            name_or_path,
            num_labels=num_classes,
            ignore_mismatched_sizes=True,
            dtype=torch.float32,
            output_loading_info=True,
        )
    new = sorted(set(info.get("missing_keys", ())) | {key for key, *_ in info.get("mismatched_keys", ())})
    LOG.info(
        "loaded %s (%s, %d classes); newly initialised: %s",
        name_or_path,
        model.config.model_type,
        num_classes,
        ", ".join(new) if new else "nothing",
    )
    return model


def _vision_lora(lora: LoraSettings, model_type: str) -> LoraSettings:
    """``lora`` with the family's default targets when it names none."""
    return lora if lora.targets else replace(lora, targets=VISION_LORA_TARGETS[model_type])


@lru_cache(maxsize=4)
def _template(name_or_path: str, num_classes: int, seed: int, lora: LoraSettings | None) -> PreTrainedModel:
    """The cached model every :func:`vision_library_model` call copies (never handed out itself)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = load_vision_model(name_or_path, num_classes)
        if lora is not None:
            apply_lora(model, _vision_lora(lora, model.config.model_type), "classification")
    return model.eval()


def vision_library_model(name_or_path: str, num_classes: int, seed: int = 0, lora: LoraSettings | None = None) -> PreTrainedModel:
    """A fresh unsplit image classifier from the per-process cache (frozen weights shared, trainable ones copied).

    Initial weights (a new head, LoRA adapters, a tiny model's weights) depend on ``seed`` alone.
    """
    template = _template(name_or_path, num_classes, seed, lora)
    return copy_sharing_frozen(template)


def clear_vision_model_cache() -> None:
    """Forget every cached vision template and configuration (e.g. after a local checkpoint directory changed)."""
    _template.cache_clear()
    _family.cache_clear()


# ---------------------------------------------------------------------------------------- split models
Modules = dict[str, nn.Module]


def batchnorm_modules(module: nn.Module) -> list[nn.Module]:
    """Every BatchNorm layer inside ``module``."""
    return [m for m in module.modules() if isinstance(m, _BATCHNORMS)]


class ClientSegment(nn.ModuleDict):
    """The client's modules by name; with ``frozen_batchnorm`` its BatchNorm layers stay in eval mode."""

    def __init__(self, modules: Modules, frozen_batchnorm: bool) -> None:
        super().__init__(modules)
        self.frozen_batchnorm = frozen_batchnorm
        if frozen_batchnorm:
            for norm in batchnorm_modules(self):
                norm.requires_grad_(False)
        self.train(self.training)

    def train(self, mode: bool = True) -> ClientSegment:
        """Set the mode of every module; frozen BatchNorm layers stay in eval mode."""
        super().train(mode)
        if self.frozen_batchnorm:
            for norm in batchnorm_modules(self):
                norm.eval()
        return self


class VisionSplitModel(SplitModel):
    """A Hugging Face image classifier cut after block ``cut_layer`` (``1..num_blocks-1``).

    ``smash`` takes ``{"x": images}`` and returns ``{"z": activation}``; ``head`` returns
    ``(B, num_classes)`` logits. ``library_model`` is the unsplit model whose modules both segments
    share (kept out of the module tree, so state dicts stay split). ``client_batchnorm`` is one of
    :data:`CLIENT_BATCHNORM_MODES`; frozen client BatchNorm layers keep eval mode through ``train()`` on
    the split model or its client segment (``library_model.train()`` bypasses that).
    """

    library_model: PreTrainedModel
    # ``nn.ModuleDict`` segments whose modules are reached by attribute
    client: Any
    server: Any

    def __init__(self, library_model: PreTrainedModel, cut_layer: int, client_batchnorm: str = "frozen") -> None:
        super().__init__()
        config = library_model.config
        _check_client_batchnorm(client_batchnorm)
        _check_cut(config, cut_layer)
        object.__setattr__(self, "library_model", library_model)
        self.config = config
        self.cut_layer = cut_layer
        self.client_batchnorm = client_batchnorm
        self.num_classes = cast(int, config.num_labels)
        client, server = self._segments(library_model, cut_layer)
        self.client = ClientSegment(client, frozen_batchnorm=client_batchnorm == "frozen")
        self.server = nn.ModuleDict(server)

    def _segments(self, model: PreTrainedModel, cut_layer: int) -> tuple[Modules, Modules]:
        """Client and server modules by name."""
        raise NotImplementedError


class ResNetSplit(VisionSplitModel):
    """ResNet (``ResNetForImageClassification``) cut after stage ``cut_layer`` (default 2).

    Client: the stem (``resnet.embedder``: 7x7 convolution, BatchNorm, ReLU, max-pool) and the first
    ``cut_layer`` stages; server: the remaining stages, global average pooling and the classifier.
    The paper's ImageNet-pretrained ResNet-18 is ``microsoft/resnet-18``; the official HO-SFL code
    cuts torchvision's ``resnet18`` at ``children()`` index 6 (``conv1``, ``bn1``, ``relu``,
    ``maxpool``, ``layer1``, ``layer2`` on the client), which is ``cut_layer=2`` here.
    """

    def _segments(self, model: PreTrainedModel, cut_layer: int) -> tuple[Modules, Modules]:
        heads: Any = model
        base = heads.resnet
        stages = base.encoder.stages
        client = {"embedder": base.embedder, "stages": nn.ModuleList(stages[:cut_layer])}
        server = {"stages": nn.ModuleList(stages[cut_layer:]), "pooler": base.pooler, "classifier": heads.classifier}
        return client, server

    def smash(self, inputs: Inputs) -> Smashed:
        hidden = self.client.embedder(inputs["x"])
        for stage in self.client.stages:
            hidden = stage(hidden)
        return {"z": hidden}

    def head(self, smashed: Mapping[str, torch.Tensor]) -> torch.Tensor:
        hidden = smashed["z"]
        for stage in self.server.stages:
            hidden = stage(hidden)
        return self.server.classifier(self.server.pooler(hidden))


class ViTSplit(VisionSplitModel):
    """ViT (``ViTForImageClassification``) cut after encoder layer ``cut_layer`` (default: half the layers).

    Client: patch, CLS and position embeddings and the first ``cut_layer`` layers; server: the
    remaining layers, the final layer norm and the classifier on the CLS token. Images must have the
    configuration's size, as in the library's forward; with ``interpolate_pos_encoding`` the position
    embeddings are interpolated to other sizes, as ``forward(interpolate_pos_encoding=True)`` does.
    """

    def __init__(
        self,
        library_model: PreTrainedModel,
        cut_layer: int,
        client_batchnorm: str = "frozen",
        interpolate_pos_encoding: bool = False,
    ) -> None:
        super().__init__(library_model, cut_layer, client_batchnorm)
        self.interpolate_pos_encoding = interpolate_pos_encoding

    def _segments(self, model: PreTrainedModel, cut_layer: int) -> tuple[Modules, Modules]:
        heads: Any = model
        base = heads.vit
        client = {"embeddings": base.embeddings, "layers": nn.ModuleList(base.layers[:cut_layer])}
        server = {"layers": nn.ModuleList(base.layers[cut_layer:]), "layernorm": base.layernorm, "classifier": heads.classifier}
        return client, server

    def _run_layers(self, layers: nn.ModuleList, hidden: torch.Tensor) -> torch.Tensor:
        mask = create_bidirectional_mask(config=self.config, inputs_embeds=hidden, attention_mask=None)
        for layer in layers:
            hidden = layer(hidden, mask)
        return hidden

    def smash(self, inputs: Inputs) -> Smashed:
        embeddings = self.client.embeddings
        pixels = inputs["x"].to(embeddings.patch_embeddings.projection.weight.dtype)
        hidden = embeddings(pixels, interpolate_pos_encoding=self.interpolate_pos_encoding)
        return {"z": self._run_layers(self.client.layers, hidden)}

    def head(self, smashed: Mapping[str, torch.Tensor]) -> torch.Tensor:
        hidden = self.server.layernorm(self._run_layers(self.server.layers, smashed["z"]))
        return self.server.classifier(hidden[:, 0, :])


VISION_SPLIT_FAMILIES: dict[str, type[VisionSplitModel]] = {"resnet": ResNetSplit, "vit": ViTSplit}
"""The split class of each supported vision ``config.model_type``."""


def split_vision_model(library_model: PreTrainedModel, cut_layer: int, client_batchnorm: str = "frozen") -> VisionSplitModel:
    """Cut a library image classifier after block ``cut_layer``."""
    model_type = library_model.config.model_type
    if model_type not in VISION_SPLIT_FAMILIES:
        raise ValueError(_unsupported(model_type))
    return VISION_SPLIT_FAMILIES[model_type](library_model, cut_layer, client_batchnorm)


def build_vision_split_model(
    name_or_path: str,
    cut_layer: int | None = None,
    num_classes: int = 10,
    seed: int = 0,
    lora: LoraSettings | None = None,
    client_batchnorm: str = "frozen",
) -> VisionSplitModel:
    """A split image classifier in eval mode, cheap to rebuild (see :func:`vision_library_model`).

    ``name_or_path``: a key of :data:`VISION_TINY_CONFIGS`, a hub name or a local directory of a
    ResNet or ViT checkpoint. ``cut_layer`` ``None`` takes :func:`default_vision_cut`. The settings are
    checked against the configuration before any weights are read.
    """
    _check_client_batchnorm(client_batchnorm)
    model_type, num_blocks, default_cut = _family(name_or_path)
    if model_type not in VISION_SPLIT_FAMILIES:
        raise ValueError(_unsupported(model_type))
    cut = default_cut if cut_layer is None else cut_layer
    if not 1 <= cut < num_blocks:
        raise ValueError(_cut_error(cut, model_type, num_blocks))
    unsplit = vision_library_model(name_or_path, num_classes, seed, lora)
    model = split_vision_model(unsplit, cut, client_batchnorm)
    if lora is not None and not trainable_parameters(model.client):
        targets = _vision_lora(lora, model_type).targets
        raise ValueError(f"LoRA targets {list(targets)} match no module of the client segment (cut-layer {cut})")
    return model.eval()
