"""Hugging Face transformers cut after a transformer block.

The split model shares (does not copy) the modules of an unsplit library model (``transformers``
task model, optionally with ``peft`` LoRA adapters) and replays that model's own forward sequence,
cut in two: the client runs the embeddings and the first ``cut_layer`` blocks, the server the
remaining blocks, the final norm and the task head. Masks and rotary embeddings are built with the
library's own utilities on each side from the companions that travel with ``z``.
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Mapping, Sequence
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
        if task not in self.supported_tasks:
            allowed = ", ".join(self.supported_tasks)
            raise ValueError(f"task {task!r} is not available for {config.model_type}; allowed: {allowed}")
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

    # ------------------------------------------------------------------ SplitModel
    def head(self, smashed: Mapping[str, torch.Tensor]) -> torch.Tensor:
        hidden = self._trunk(smashed)
        if self.task == "classification":
            return self._classify(hidden, smashed["attention_mask"])
        if self.task == "causal-lm":
            return self.server.lm_head(hidden)
        last = _select_rows(hidden, last_token_index(smashed["attention_mask"]))
        return self.server.lm_head(last)[:, self.verbalizer_ids]

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
    """The LM head; a trainable head tied to the input embedding gets its own weight (the server's)."""
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


_MASK_BUILDERS = {"full_attention": create_causal_mask, "sliding_attention": create_sliding_window_causal_mask}


def _attention_types(config: PretrainedConfig) -> list[str]:
    """Each layer's mask kind, as the family's model forward chooses it."""
    if config.model_type == "qwen2":
        return list(config.layer_types)
    if config.model_type == "mistral" and config.sliding_window is not None:
        return ["sliding_attention"] * config.num_hidden_layers
    return ["full_attention"] * config.num_hidden_layers


class LlamaLayoutSplit(HFSplitModel):
    """Decoders laid out as ``model.embed_tokens`` / ``model.layers`` / ``model.norm`` / ``model.rotary_emb``
    (Llama, Qwen2, Mistral, Gemma): positions ``0..T-1``, rotary embeddings rebuilt on each side by the
    model's own rotary module, causal or sliding-window masks per layer. Gemma's embedding scaling
    lives in its ``embed_tokens`` module."""

    @staticmethod
    def _blocks(model: PreTrainedModel) -> nn.ModuleList:
        return model.model.layers

    @property
    def attention_types(self) -> list[str]:
        """Each layer's mask kind (``full_attention`` or ``sliding_attention``)."""
        return _attention_types(self.config)

    def _segments(self, model: PreTrainedModel, cut_layer: int) -> tuple[Modules, Modules]:
        base = model.model
        client = {"embed_tokens": base.embed_tokens, "rotary_emb": base.rotary_emb}
        client["layers"] = nn.ModuleList(base.layers[:cut_layer])
        server = {"rotary_emb": base.rotary_emb, "layers": nn.ModuleList(base.layers[cut_layer:]), "norm": base.norm}
        return client, server

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
        masks = {kind: _MASK_BUILDERS[kind](**mask_kwargs) for kind in sorted(set(kinds))}
        position_embeddings = rotary_emb(hidden, position_ids=position_ids)
        for layer, kind in zip(layers, kinds):
            hidden = layer(
                hidden,
                attention_mask=masks[kind],
                position_embeddings=position_embeddings,
                position_ids=position_ids,
                past_key_values=None,
                use_cache=False,
            )
        return hidden

    def smash(self, inputs: Inputs) -> Smashed:
        input_ids, attention_mask = inputs["input_ids"], inputs["attention_mask"]
        position_ids = torch.arange(input_ids.shape[1], device=input_ids.device).unsqueeze(0)
        z = self._run_layers(
            self.client.layers,
            self.attention_types[: self.cut_layer],
            self.client.embed_tokens(input_ids),
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
        return self.server.norm(hidden)


class BertLayoutSplit(HFSplitModel):
    """Encoders laid out as ``embeddings`` / ``encoder.layer`` (BERT, RoBERTa): word, position and
    token-type embeddings (RoBERTa numbers positions from the pad id), bidirectional padding mask, and
    the library's classification head (BERT: pooler, dropout, classifier; RoBERTa: ``<s>`` head).
    ``token_type_ids`` are read from the inputs when present. Classification only."""

    supported_tasks = ("classification",)

    def __init__(
        self, library_model: PreTrainedModel, cut_layer: int, task: str, verbalizer_ids: Sequence[int] | None = None
    ) -> None:
        if library_model.config.is_decoder:
            raise ValueError("a BERT-layout model configured as a decoder cannot be split as an encoder")
        super().__init__(library_model, cut_layer, task, verbalizer_ids)

    @staticmethod
    def _blocks(model: PreTrainedModel) -> nn.ModuleList:
        base: Any = model.base_model
        return base.encoder.layer

    def _segments(self, model: PreTrainedModel, cut_layer: int) -> tuple[Modules, Modules]:
        base: Any = model.base_model
        client = {"embeddings": base.embeddings, "layer": nn.ModuleList(base.encoder.layer[:cut_layer])}
        return client, {"layer": nn.ModuleList(base.encoder.layer[cut_layer:])}

    def _classifier_modules(self, model: PreTrainedModel) -> Modules:
        heads: Any = model  # BERT/RoBERTa task models: their head modules are reached by attribute
        if heads.base_model.pooler is not None:
            return {"pooler": heads.base_model.pooler, "dropout": heads.dropout, "classifier": heads.classifier}
        return {"classifier": heads.classifier}

    def _run_layers(self, layers: nn.ModuleList, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        mask = create_bidirectional_mask(config=self.config, inputs_embeds=hidden, attention_mask=attention_mask)
        for layer in layers:
            hidden = layer(hidden, mask, None, encoder_attention_mask=None, past_key_values=None)
        return hidden

    def smash(self, inputs: Inputs) -> Smashed:
        attention_mask = inputs["attention_mask"]
        hidden = self.client.embeddings(input_ids=inputs["input_ids"], token_type_ids=inputs.get("token_type_ids"))
        return {"z": self._run_layers(self.client.layer, hidden, attention_mask), "attention_mask": attention_mask}

    def _trunk(self, smashed: Mapping[str, torch.Tensor]) -> torch.Tensor:
        return self._run_layers(self.server.layer, smashed["z"], smashed["attention_mask"])

    def _classify(self, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        if "pooler" in self.server:
            return self.server.classifier(self.server.dropout(self.server.pooler(hidden)))
        return self.server.classifier(hidden)


SPLIT_FAMILIES: dict[str, type[HFSplitModel]] = {
    "gpt2": GPT2Split,
    "opt": OPTSplit,
    "llama": LlamaLayoutSplit,
    "qwen2": LlamaLayoutSplit,
    "mistral": LlamaLayoutSplit,
    "gemma": LlamaLayoutSplit,
    "bert": BertLayoutSplit,
    "roberta": BertLayoutSplit,
}
"""The split class of each supported ``config.model_type``."""


def split_library_model(
    library_model: PreTrainedModel, cut_layer: int, task: str, verbalizer_ids: Sequence[int] | None = None
) -> HFSplitModel:
    """Cut a library task model (``*ForSequenceClassification`` or ``*ForCausalLM``) after block ``cut_layer``."""
    model_type = library_model.config.model_type
    if model_type not in SPLIT_FAMILIES:
        raise ValueError(f"cannot split {model_type!r} models; supported: {', '.join(sorted(SPLIT_FAMILIES))}")
    return SPLIT_FAMILIES[model_type](library_model, cut_layer, task, verbalizer_ids)
