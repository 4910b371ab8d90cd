"""Hugging Face transformers cut after a transformer block.

The split model shares (does not copy) the modules of an unsplit library model (``transformers``
task model, optionally with ``peft`` LoRA adapters) and replays that model's own forward sequence,
cut in two: the client runs the embeddings and the first ``cut_layer`` blocks, the server the
remaining blocks, the final norm and the task head. Masks and rotary embeddings are built with the
library's own utilities on each side from the companions that travel with ``z``.

Two generic splitters cover most families, reading the layout from the model's module tree:
:class:`RotaryDecoderSplit` (decoders built from a list of layers with the library's rotary embedding
and mask functions: Llama, SmolLM, Qwen2/3, Mistral, Phi-3, Gemma, GPT-NeoX/Pythia) and
:class:`EncoderSplit` (BERT-style encoders). GPT-2 and OPT (learned positions), Gemma-3 (bidirectional
option, logit soft-capping) and DistilBERT (its classification head) add what their model forward does
beyond that. Only the model types whose forward has been checked against the generic replay are accepted
(:data:`SPLIT_FAMILIES`): a family can match a layout yet scale embeddings or logits in its model forward.
"""

from __future__ import annotations

import dataclasses
import inspect
from abc import abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, cast

import torch
from torch import nn
from transformers import PretrainedConfig, PreTrainedModel
from transformers.loss.loss_utils import ForCausalLMLoss
from transformers.masking_utils import (
    create_bidirectional_mask,
    create_causal_mask,
    create_sliding_window_causal_mask,
)

from ..base import TASKS, Inputs, Smashed, SplitModel

Modules = dict[str, nn.Module]

"""``classification``: sequence classification; ``causal-lm``: next-token prediction;
``verbalizer``: next-token logits of the verbalizer tokens at the last non-padding position."""


def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """Index of each row's rightmost attended token (left or right padding).

    The library's ``*ForSequenceClassification`` takes the rightmost token that is not ``pad_token_id``;
    the attention mask gives the same index whenever pad tokens appear only as padding.
    """
    positions = torch.arange(attention_mask.shape[-1], device=attention_mask.device, dtype=torch.int32)
    return (positions * attention_mask.to(torch.int32)).argmax(-1)


def _select_rows(values: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``values[b, index[b]]`` for every row ``b``."""
    return values[torch.arange(values.shape[0], device=values.device), index]


class HFSplitModel(SplitModel):
    """A Hugging Face model cut after block ``cut_layer`` (``1..num_layers-1``).

    ``smash`` takes ``{"input_ids", "attention_mask"}`` (``(B, T)`` integers) and returns ``z``, the
    float32 hidden states ``(B, T, H)`` after the client's last block, with the companions the server
    needs (``attention_mask``, and ``position_ids`` for decoders). ``head`` returns ``(B, num_classes)``
    logits (``classification``, ``verbalizer``) or ``(B, T, vocab)`` LM logits (``causal-lm``).

    ``library_model`` is the unsplit library model whose modules both segments share (kept out of the
    module tree, so state dicts stay split). A trainable LM head tied to the client's input embedding
    is untied: the server gets its own copy, and ``library_model`` uses it too.
    """

    supported_tasks: tuple[str, ...] = TASKS
    library_model: PreTrainedModel
    # ``nn.ModuleDict`` segments whose modules the family code reaches by attribute; torch types
    # ``Module.__getattr__`` as ``Tensor | Module``, so the segments are typed ``Any`` here.
    client: Any
    server: Any

    def __init__(
        self, library_model: PreTrainedModel, cut_layer: int, task: str, verbalizer_ids: Sequence[int] | None = None
    ) -> None:
        super().__init__()
        config = library_model.config
        self.check_task(task, config.model_type)
        num_layers = len(self._blocks(library_model))
        if not 1 <= cut_layer < num_layers:
            raise ValueError(
                f"cut-layer {cut_layer} is outside 1..{num_layers - 1} ({config.model_type} with {num_layers} layers)"
            )
        object.__setattr__(self, "library_model", library_model)
        self.config = config
        self.cut_layer = cut_layer
        self.task = task
        client, server = self._segments(library_model, cut_layer)
        ids = None
        if task == "classification":
            server.update(self._classifier_modules(library_model))
            self.num_classes = cast(int, config.num_labels)
        else:
            server["lm_head"] = _untied_lm_head(library_model)
            self.num_classes = config.get_text_config().vocab_size
        if task == "verbalizer":
            ids = torch.as_tensor(list(verbalizer_ids or ()), dtype=torch.long)
            if ids.numel() < 2 or int(ids.min()) < 0 or int(ids.max()) >= self.num_classes:
                raise ValueError(f"verbalizer needs at least two token ids in 0..{self.num_classes - 1}, got {ids.tolist()}")
            self.num_classes = int(ids.numel())
        self.verbalizer_ids: torch.Tensor | None
        self.register_buffer("verbalizer_ids", ids, persistent=False)
        self.client = nn.ModuleDict(client)
        self.server = nn.ModuleDict(server)

    @classmethod
    def check_task(cls, task: str, model_type: str) -> None:
        """Raise a one-line ``ValueError`` unless the family splits for ``task``."""
        if task not in cls.supported_tasks:
            allowed = ", ".join(cls.supported_tasks)
            raise ValueError(f"task {task!r} is not available for {model_type}; allowed: {allowed}")

    # ------------------------------------------------------------------ family hooks
    @staticmethod
    @abstractmethod
    def _blocks(model: PreTrainedModel) -> nn.ModuleList:
        """The model's transformer blocks, in order."""

    @abstractmethod
    def _segments(self, model: PreTrainedModel, cut_layer: int) -> tuple[Modules, Modules]:
        """Client and server modules by name (without the task head)."""

    def _classifier_modules(self, model: PreTrainedModel) -> Modules:
        """The server modules of the sequence-classification head."""
        return {"score": cast(nn.Module, model.score)}

    @abstractmethod
    def _trunk(self, smashed: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Server blocks and final norm: the last hidden states the task head reads."""

    def _classify(self, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Decoder classification: score every position, keep the last non-padding one."""
        return _select_rows(self.server.score(hidden), last_token_index(attention_mask))

    def _lm_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """The LM head on the last hidden states, as the library's ``*ForCausalLM`` applies it."""
        return self.server.lm_head(hidden)

    # ------------------------------------------------------------------ SplitModel
    def head(self, smashed: Mapping[str, torch.Tensor]) -> torch.Tensor:
        hidden = self._trunk(smashed)
        if self.task == "classification":
            return self._classify(hidden, smashed["attention_mask"])
        if self.task == "causal-lm":
            return self._lm_logits(hidden)
        last = _select_rows(hidden, last_token_index(smashed["attention_mask"]))
        return self._lm_logits(last)[:, self.verbalizer_ids]

    def count_correct(self, logits: torch.Tensor, labels: torch.Tensor) -> tuple[int, int]:
        """Classification: per example; ``causal-lm``: next-token predictions at non-ignored positions."""
        if self.task != "causal-lm":
            return super().count_correct(logits, labels)
        predicted, target = logits[:, :-1].argmax(dim=-1), labels[:, 1:]
        counted = target != -100
        return int(((predicted == target) & counted).sum()), int(counted.sum())

    def loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Cross-entropy; for ``causal-lm`` the library's shifted next-token loss (labels ``(B, T)``, -100 ignored)."""
        if self.task == "causal-lm":
            return ForCausalLMLoss(logits, labels, vocab_size=logits.shape[-1])
        return super().loss(logits, labels)


def _untied_lm_head(model: PreTrainedModel) -> nn.Module:
    """The LM head; a trainable head tied to the input embedding gets its own weight (the server's).

    A frozen tied head (LoRA) stays shared with the client's embedding: neither side changes it.
    """
    lm_head = model.get_output_embeddings()
    embeddings = model.get_input_embeddings()
    weight = cast(nn.Parameter, lm_head.weight)
    if weight is embeddings.weight and weight.requires_grad:
        lm_head.weight = nn.Parameter(weight.detach().clone())
        model.config.tie_word_embeddings = False
    return lm_head


def _decoder_companions(attention_mask: torch.Tensor, position_ids: torch.Tensor) -> dict[str, torch.Tensor]:
    """Decoder companions of ``z``: the 2-D padding mask and per-example position ids ``(B, T)``."""
    batch = attention_mask.shape[0]
    return {"attention_mask": attention_mask, "position_ids": position_ids.expand(batch, -1).contiguous()}


class GPT2Split(HFSplitModel):
    """GPT-2: token (``wte``) plus learned position (``wpe``) embeddings, causal mask, final ``ln_f``."""

    @staticmethod
    def _blocks(model: PreTrainedModel) -> nn.ModuleList:
        transformer: Any = model.transformer
        return transformer.h

    def _segments(self, model: PreTrainedModel, cut_layer: int) -> tuple[Modules, Modules]:
        base: Any = model.transformer
        client = {"wte": base.wte, "wpe": base.wpe, "drop": base.drop, "h": nn.ModuleList(base.h[:cut_layer])}
        return client, {"h": nn.ModuleList(base.h[cut_layer:]), "ln_f": base.ln_f}

    def _run_blocks(
        self, blocks: nn.ModuleList, hidden: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor
    ) -> torch.Tensor:
        mask = create_causal_mask(
            config=self.config,
            inputs_embeds=hidden,
            attention_mask=attention_mask,
            past_key_values=None,
            position_ids=position_ids,
        )
        for block in blocks:
            hidden = block(hidden, None, mask, None, encoder_attention_mask=None, use_cache=False, position_ids=position_ids)
        return hidden

    def smash(self, inputs: Inputs) -> Smashed:
        input_ids, attention_mask = inputs["input_ids"], inputs["attention_mask"]
        position_ids = torch.arange(input_ids.shape[1], device=input_ids.device).unsqueeze(0)
        hidden = self.client.drop(self.client.wte(input_ids) + self.client.wpe(position_ids))
        z = self._run_blocks(self.client.h, hidden, attention_mask, position_ids)
        return {"z": z, **_decoder_companions(attention_mask, position_ids)}

    def _trunk(self, smashed: Mapping[str, torch.Tensor]) -> torch.Tensor:
        hidden = self._run_blocks(self.server.h, smashed["z"], smashed["attention_mask"], smashed["position_ids"])
        return self.server.ln_f(hidden)


class OPTSplit(HFSplitModel):
    """OPT: learned positions from the padding mask (offset 2), ``project_in`` before the blocks,
    ``final_layer_norm`` (pre-norm models only) then ``project_out`` after them."""

    def __init__(
        self, library_model: PreTrainedModel, cut_layer: int, task: str, verbalizer_ids: Sequence[int] | None = None
    ) -> None:
        if library_model.config.layerdrop > 0:
            raise ValueError("OPT with layerdrop > 0 cannot be split (the split replays every layer)")
        super().__init__(library_model, cut_layer, task, verbalizer_ids)

    @staticmethod
    def _blocks(model: PreTrainedModel) -> nn.ModuleList:
        return model.model.decoder.layers

    def _segments(self, model: PreTrainedModel, cut_layer: int) -> tuple[Modules, Modules]:
        decoder = model.model.decoder
        client = {"embed_tokens": decoder.embed_tokens, "embed_positions": decoder.embed_positions}
        server: Modules = {"layers": nn.ModuleList(decoder.layers[cut_layer:])}
        if decoder.project_in is not None:
            client["project_in"] = decoder.project_in
        client["layers"] = nn.ModuleList(decoder.layers[:cut_layer])
        if decoder.final_layer_norm is not None:
            server["final_layer_norm"] = decoder.final_layer_norm
        if decoder.project_out is not None:
            server["project_out"] = decoder.project_out
        return client, server

    def _run_layers(
        self, layers: nn.ModuleList, hidden: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor
    ) -> torch.Tensor:
        mask = create_causal_mask(config=self.config, inputs_embeds=hidden, attention_mask=attention_mask, past_key_values=None)
        for layer in layers:
            hidden = layer(hidden, attention_mask=mask, position_ids=position_ids, past_key_values=None, use_cache=False)
        return hidden

    def smash(self, inputs: Inputs) -> Smashed:
        input_ids, attention_mask = inputs["input_ids"], inputs["attention_mask"]
        inputs_embeds = self.client.embed_tokens(input_ids)
        position_ids = (torch.cumsum(attention_mask, dim=1) * attention_mask - 1).long()
        pos_embeds = self.client.embed_positions(attention_mask, 0, position_ids=position_ids)
        if "project_in" in self.client:
            inputs_embeds = self.client.project_in(inputs_embeds)
        z = self._run_layers(self.client.layers, inputs_embeds + pos_embeds, attention_mask, position_ids)
        return {"z": z, **_decoder_companions(attention_mask, position_ids)}

    def _trunk(self, smashed: Mapping[str, torch.Tensor]) -> torch.Tensor:
        hidden = self._run_layers(self.server.layers, smashed["z"], smashed["attention_mask"], smashed["position_ids"])
        if "final_layer_norm" in self.server:
            hidden = self.server.final_layer_norm(hidden)
        if "project_out" in self.server:
            hidden = self.server.project_out(hidden)
        return hidden


MaskFunction = Callable[..., Any]

_MASK_BUILDERS: dict[str, MaskFunction] = {
    "full_attention": create_causal_mask,
    "sliding_attention": create_sliding_window_causal_mask,
}


def _declares(config: PretrainedConfig, field: str) -> bool:
    """Whether the config class declares ``field`` (a stray key from a hub file does not count)."""
    if dataclasses.is_dataclass(config):
        return field in {f.name for f in dataclasses.fields(config)}
    return hasattr(config, field)


def attention_kinds(config: PretrainedConfig) -> list[str]:
    """Each layer's mask kind (``full_attention`` or ``sliding_attention``), as the library's decoders choose it.

    ``config.layer_types`` where the family declares it (Qwen2/3, Gemma-3); otherwise sliding-window
    attention in every layer when the family declares a ``sliding_window`` and it is set (Mistral,
    Phi-3), else causal attention in every layer.
    """
    if _declares(config, "layer_types") and config.layer_types is not None:
        return list(config.layer_types)
    if _declares(config, "sliding_window") and config.sliding_window is not None:
        return ["sliding_attention"] * config.num_hidden_layers
    return ["full_attention"] * config.num_hidden_layers


@dataclass(frozen=True)
class RotaryDecoderLayout:
    """Attribute names of a rotary decoder's base model (the split segments use the same names)."""

    embedding: str
    """The token embedding (``embed_tokens``, GPT-NeoX ``embed_in``)."""
    embedding_dropout: str | None
    """Dropout after the embedding (GPT-NeoX ``emb_dropout``), if the model has one."""
    norm: str
    """The final norm (``norm``, GPT-NeoX ``final_layer_norm``)."""
    rotary_takes_layer_type: bool
    """Whether ``rotary_emb`` takes a layer type (one rotary embedding per kind, Gemma-3)."""

    @classmethod
    def of(cls, model: PreTrainedModel) -> RotaryDecoderLayout:
        """Read the layout from ``model.base_model``: ``layers`` (a ``ModuleList``), ``rotary_emb``, the
        input embedding, at most one dropout and exactly one other module, the final norm."""
        base: Any = model.base_model
        children = dict(base.named_children())
        embedding = [name for name, module in children.items() if module is base.get_input_embeddings()]
        others = [name for name in children if name not in {*embedding, "layers", "rotary_emb"}]
        dropouts = [name for name in others if isinstance(children[name], nn.Dropout)]
        norms = [name for name in others if name not in dropouts]
        rotary = children.get("rotary_emb")
        if (
            len(embedding) != 1
            or not isinstance(children.get("layers"), nn.ModuleList)
            or rotary is None
            or len(dropouts) > 1
            or len(norms) != 1
        ):
            raise ValueError(
                f"{model.config.model_type} ({type(model).__name__}) is not laid out as an embedding, `layers`, "
                f"a final norm and `rotary_emb`: its base model has {', '.join(children)}"
            )
        return cls(
            embedding=embedding[0],
            embedding_dropout=dropouts[0] if dropouts else None,
            norm=norms[0],
            rotary_takes_layer_type="layer_type" in inspect.signature(rotary.forward).parameters,
        )


class RotaryDecoderSplit(HFSplitModel):
    """Decoders built from a list of layers with the library's rotary embedding and mask functions
    (Llama and SmolLM, Qwen2/3, Mistral, Phi-3, Gemma, GPT-NeoX/Pythia).

    The layout is read from the base model (:class:`RotaryDecoderLayout`). Positions are ``0..T-1``;
    each side rebuilds the rotary embeddings with the model's own ``rotary_emb`` (one per layer type when
    it takes one) and the causal or sliding-window masks of its layers (:func:`attention_kinds`).
    Embedding scaling (Gemma) lives in the embedding module.
    """

    layout: RotaryDecoderLayout

    def __init__(
        self, library_model: PreTrainedModel, cut_layer: int, task: str, verbalizer_ids: Sequence[int] | None = None
    ) -> None:
        kinds = attention_kinds(library_model.config)
        unknown = sorted(set(kinds) - set(_MASK_BUILDERS))
        if unknown:
            raise ValueError(
                f"{library_model.config.model_type} has layer types {unknown}; splittable: {', '.join(_MASK_BUILDERS)}"
            )
        super().__init__(library_model, cut_layer, task, verbalizer_ids)
        self.attention_types = kinds

    @staticmethod
    def _blocks(model: PreTrainedModel) -> nn.ModuleList:
        RotaryDecoderLayout.of(model)  # a model of another layout fails here, in one line
        return cast(nn.ModuleList, model.base_model.layers)

    def _segments(self, model: PreTrainedModel, cut_layer: int) -> tuple[Modules, Modules]:
        base: Any = model.base_model
        layout = self.layout = RotaryDecoderLayout.of(model)
        client: Modules = {layout.embedding: getattr(base, layout.embedding)}
        if layout.embedding_dropout is not None:
            client[layout.embedding_dropout] = getattr(base, layout.embedding_dropout)
        client["rotary_emb"] = base.rotary_emb
        client["layers"] = nn.ModuleList(base.layers[:cut_layer])
        server: Modules = {"rotary_emb": base.rotary_emb, "layers": nn.ModuleList(base.layers[cut_layer:])}
        server[layout.norm] = getattr(base, layout.norm)
        return client, server

    def _mask_kwargs(self, kind: str) -> dict[str, Any]:
        """Extra arguments of the mask function for layers of ``kind`` (none for most families)."""
        return {}

    def _run_layers(
        self,
        layers: nn.ModuleList,
        kinds: list[str],
        hidden: torch.Tensor,
        attention_mask: torch.Tensor,
        position_ids: torch.Tensor,
        rotary_emb: nn.Module,
    ) -> torch.Tensor:
        mask_kwargs: dict[str, Any] = {
            "config": self.config,
            "inputs_embeds": hidden,
            "attention_mask": attention_mask,
            "past_key_values": None,
            "position_ids": position_ids,
        }
        masks = {kind: _MASK_BUILDERS[kind](**mask_kwargs, **self._mask_kwargs(kind)) for kind in sorted(set(kinds))}
        if self.layout.rotary_takes_layer_type:
            rotary = {kind: rotary_emb(hidden, position_ids, layer_type=kind) for kind in sorted(set(kinds))}
        else:
            shared = rotary_emb(hidden, position_ids=position_ids)
            rotary = dict.fromkeys(kinds, shared)
        for layer, kind in zip(layers, kinds):
            hidden = layer(hidden, attention_mask=masks[kind], position_embeddings=rotary[kind], position_ids=position_ids)
        return hidden

    def smash(self, inputs: Inputs) -> Smashed:
        input_ids, attention_mask = inputs["input_ids"], inputs["attention_mask"]
        position_ids = torch.arange(input_ids.shape[1], device=input_ids.device).unsqueeze(0)
        hidden = self.client[self.layout.embedding](input_ids)
        if self.layout.embedding_dropout is not None:
            hidden = self.client[self.layout.embedding_dropout](hidden)
        z = self._run_layers(
            self.client.layers,
            self.attention_types[: self.cut_layer],
            hidden,
            attention_mask,
            position_ids,
            self.client.rotary_emb,
        )
        return {"z": z, **_decoder_companions(attention_mask, position_ids)}

    def _trunk(self, smashed: Mapping[str, torch.Tensor]) -> torch.Tensor:
        hidden = self._run_layers(
            self.server.layers,
            self.attention_types[self.cut_layer :],
            smashed["z"],
            smashed["attention_mask"],
            smashed["position_ids"],
            self.server.rotary_emb,
        )
        return self.server[self.layout.norm](hidden)


def _attend_everywhere(batch_idx: Any, head_idx: Any, q_idx: Any, kv_idx: Any) -> torch.Tensor:
    """Mask function: every position attends to every other one."""
    return torch.tensor(True, dtype=torch.bool)


def _within_window(window: int) -> MaskFunction:
    """Mask function: positions closer than ``window`` attend to each other, in both directions."""

    def within(batch_idx: Any, head_idx: Any, q_idx: Any, kv_idx: Any) -> Any:
        return abs(q_idx - kv_idx) < window

    return within


class Gemma3TextSplit(RotaryDecoderSplit):
    """Gemma-3 text (``gemma3_text``): the rotary decoder with per-layer-type rotary embeddings and, as
    its model forward does, masks widened to both directions when ``use_bidirectional_attention`` is set,
    and LM logits soft-capped by ``final_logit_softcapping`` when it is set."""

    def _mask_kwargs(self, kind: str) -> dict[str, Any]:
        if not self.config.use_bidirectional_attention:
            return {}
        if kind == "sliding_attention":
            return {"or_mask_function": _within_window(self.config.sliding_window)}
        return {"or_mask_function": _attend_everywhere}

    def _lm_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self.server.lm_head(hidden)
        cap = self.config.final_logit_softcapping
        if cap is None:
            return logits
        return torch.tanh(logits / cap) * cap


class EncoderSplit(HFSplitModel):
    """Encoders with an ``embeddings`` module and one stack of ``layer`` blocks (BERT and RoBERTa:
    ``encoder.layer``; DistilBERT: ``transformer.layer``): the family's embeddings (``token_type_ids``
    read from the inputs when present and the embeddings take them), a bidirectional padding mask, and
    the library's classification head (BERT: pooler, dropout, classifier; RoBERTa: ``<s>`` head).
    Classification only."""

    supported_tasks = ("classification",)

    def __init__(
        self, library_model: PreTrainedModel, cut_layer: int, task: str, verbalizer_ids: Sequence[int] | None = None
    ) -> None:
        if getattr(library_model.config, "is_decoder", False):
            raise ValueError(f"a {library_model.config.model_type} model configured as a decoder cannot be split as an encoder")
        super().__init__(library_model, cut_layer, task, verbalizer_ids)
        self.embeddings_take_token_types = "token_type_ids" in inspect.signature(self.client.embeddings.forward).parameters

    @staticmethod
    def _blocks(model: PreTrainedModel) -> nn.ModuleList:
        base = model.base_model
        stacks = [m.layer for _, m in base.named_children() if isinstance(getattr(m, "layer", None), nn.ModuleList)]
        if len(stacks) != 1 or not isinstance(getattr(base, "embeddings", None), nn.Module):
            children = ", ".join(name for name, _ in base.named_children())
            raise ValueError(
                f"{model.config.model_type} ({type(model).__name__}) is not laid out as `embeddings` and one stack "
                f"of `layer` blocks: its base model has {children}"
            )
        return cast(nn.ModuleList, stacks[0])

    def _segments(self, model: PreTrainedModel, cut_layer: int) -> tuple[Modules, Modules]:
        base, blocks = model.base_model, self._blocks(model)
        client = {"embeddings": cast(nn.Module, base.embeddings), "layer": nn.ModuleList(blocks[:cut_layer])}
        return client, {"layer": nn.ModuleList(blocks[cut_layer:])}

    def _classifier_modules(self, model: PreTrainedModel) -> Modules:
        heads: Any = model  # BERT/RoBERTa task models: their head modules are reached by attribute
        if heads.base_model.pooler is not None:
            return {"pooler": heads.base_model.pooler, "dropout": heads.dropout, "classifier": heads.classifier}
        return {"classifier": heads.classifier}

    def _run_layers(self, layers: nn.ModuleList, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        mask = create_bidirectional_mask(config=self.config, inputs_embeds=hidden, attention_mask=attention_mask)
        for layer in layers:
            hidden = layer(hidden, attention_mask=mask)
        return hidden

    def smash(self, inputs: Inputs) -> Smashed:
        attention_mask = inputs["attention_mask"]
        token_types = {"token_type_ids": inputs.get("token_type_ids")} if self.embeddings_take_token_types else {}
        hidden = self.client.embeddings(input_ids=inputs["input_ids"], **token_types)
        return {"z": self._run_layers(self.client.layer, hidden, attention_mask), "attention_mask": attention_mask}

    def _trunk(self, smashed: Mapping[str, torch.Tensor]) -> torch.Tensor:
        return self._run_layers(self.server.layer, smashed["z"], smashed["attention_mask"])

    def _classify(self, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        if "pooler" in self.server:
            return self.server.classifier(self.server.dropout(self.server.pooler(hidden)))
        return self.server.classifier(hidden)


class DistilBertSplit(EncoderSplit):
    """DistilBERT: the encoder split with DistilBERT's head (first token, ``pre_classifier``, ReLU,
    dropout, ``classifier``)."""

    def _classifier_modules(self, model: PreTrainedModel) -> Modules:
        heads: Any = model
        return {"pre_classifier": heads.pre_classifier, "dropout": heads.dropout, "classifier": heads.classifier}

    def _classify(self, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        pooled = torch.relu(self.server.pre_classifier(hidden[:, 0]))
        return self.server.classifier(self.server.dropout(pooled))


SPLIT_FAMILIES: dict[str, type[HFSplitModel]] = {
    "gpt2": GPT2Split,
    "opt": OPTSplit,
    "llama": RotaryDecoderSplit,
    "qwen2": RotaryDecoderSplit,
    "qwen3": RotaryDecoderSplit,
    "mistral": RotaryDecoderSplit,
    "phi3": RotaryDecoderSplit,
    "gemma": RotaryDecoderSplit,
    "gpt_neox": RotaryDecoderSplit,
    "gemma3_text": Gemma3TextSplit,
    "bert": EncoderSplit,
    "roberta": EncoderSplit,
    "distilbert": DistilBertSplit,
}
"""The split class of each supported ``config.model_type``: the types whose model forward the split
replays exactly (a new family with a matching layout needs its entry here, a tiny config and the tests)."""


def split_class(model_type: str) -> type[HFSplitModel]:
    """The split class of ``model_type``; a one-line ``ValueError`` naming the supported types otherwise."""
    if model_type not in SPLIT_FAMILIES:
        raise ValueError(f"cannot split {model_type!r} models; supported: {', '.join(sorted(SPLIT_FAMILIES))}")
    return SPLIT_FAMILIES[model_type]


def split_library_model(
    library_model: PreTrainedModel, cut_layer: int, task: str, verbalizer_ids: Sequence[int] | None = None
) -> HFSplitModel:
    """Cut a library task model (``*ForSequenceClassification`` or ``*ForCausalLM``) after block ``cut_layer``.

    The family is the configuration class's ``model_type`` (a ``model_type`` key copied into another
    family's configuration does not make it that family).
    """
    return split_class(type(library_model.config).model_type)(library_model, cut_layer, task, verbalizer_ids)
