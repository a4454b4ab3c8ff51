"""Token-classification heads for decoder families that transformers gives none (OPT, GPT-J).

HF PEFT's support table lists token classification for OPT and GPT-J, but transformers 4.57 has no
``OPTForTokenClassification`` / ``GPTJForTokenClassification``. :func:`token_classification_class` builds
one for any decoder family whose ``AutoModelForTokenClassification`` mapping lacks it, the way transformers
builds ``GPT2ForTokenClassification``::

    logits = classifier(dropout(backbone(input_ids, attention_mask, ...).last_hidden_state))

- the backbone is the family's ``AutoModel`` class (``OPTModel``, ``GPTJModel``), stored under the
  family's ``base_model_prefix``: the attribute its ``*ForSequenceClassification`` / ``*ForCausalLM`` name
  their backbone (OPT ``model.decoder.layers.0…``, GPT-J ``transformer.h.0…``), so a causal-LM checkpoint
  of the family loads into it and adapter keys read as they would for a transformers class;
- the dropout is ``config.classifier_dropout``, else ``hidden_dropout``, else ``resid_pdrop``, else 0.1
  (GPT-2's rule, with GPT-J's residual dropout);
- ``classifier = nn.Linear(hidden, num_labels)``, ``hidden`` the backbone's output width (its input
  embedding's: OPT's ``word_embed_proj_dim``), initialised by the family's ``_init_weights``.

The class is a ``PreTrainedModel`` of the family (``save_pretrained`` / ``from_pretrained`` work) and its
forward takes ``past_key_values``, so HF PEFT's prefix tuning goes through the cache as it does for
``GPT2ForTokenClassification``. HF PEFT wraps it like any module: with ``task_type="TOKEN_CLS"`` the head
``classifier`` is trained in full and saved as ``base_model.model.classifier.weight``.
"""

from __future__ import annotations

import functools
import inspect
from typing import Any

import torch
from torch import nn

__all__ = ["needs_token_classification_head", "token_classification_class"]


def _auto_names() -> tuple[dict[str, str], dict[str, str], dict[str, str]]:
    from transformers.models.auto import modeling_auto as auto

    return (
        auto.MODEL_FOR_TOKEN_CLASSIFICATION_MAPPING_NAMES,
        auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        auto.MODEL_MAPPING_NAMES,
    )


def needs_token_classification_head(config: Any) -> bool:
    """Whether ``config`` is a decoder family with a backbone but no transformers token-classification class."""
    token_cls, causal, backbones = _auto_names()
    model_type = getattr(config, "model_type", None)
    return (
        model_type not in token_cls
        and model_type in causal
        and model_type in backbones
        and not getattr(config, "is_encoder_decoder", False)
    )


def token_classification_class(config: Any) -> type:
    """``<Family>ForTokenClassification`` for ``config``'s family (see the module docstring).

    Raises:
        ValueError: the family has a transformers class already, or is not a decoder with a backbone.
    """
    if not needs_token_classification_head(config):
        raise ValueError(
            f"model type {getattr(config, 'model_type', None)!r} needs no peftc token-classification head "
            "(transformers has one, or it is not a decoder with an AutoModel backbone)"
        )
    return _head_class(_auto_names()[2][config.model_type])


@functools.cache
def _head_class(backbone_name: str) -> type:
    import transformers

    backbone_cls = getattr(transformers, backbone_name)
    pretrained = next(
        c for c in backbone_cls.__mro__ if transformers.PreTrainedModel in c.__bases__
    )  # OPTPreTrainedModel: config class, base_model_prefix, _init_weights
    name = backbone_name.removesuffix("Model") + "ForTokenClassification"
    cls = type(name, (_DecoderForTokenClassification, pretrained), {"_backbone_class": backbone_cls})
    cls.__module__ = __name__
    cls.__qualname__ = name
    globals()[name] = cls  # importable by its name (pickle, copy) once made
    return cls


class _DecoderForTokenClassification(nn.Module):
    """decoder → dropout → linear over every position (mixed into the family's ``PreTrainedModel``)."""

    _backbone_class: type

    def __init__(self, config: Any):
        super().__init__(config)
        self.num_labels = config.num_labels
        backbone = self._backbone_class(config)
        setattr(self, self.base_model_prefix, backbone)
        dropout = next(
            (
                getattr(config, name)
                for name in ("classifier_dropout", "hidden_dropout", "resid_pdrop")
                if getattr(config, name, None) is not None
            ),
            0.1,
        )
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(backbone.get_input_embeddings().embedding_dim, config.num_labels)
        self._backbone_params = set(inspect.signature(backbone.forward).parameters)
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        return getattr(self, self.base_model_prefix).get_input_embeddings()

    def set_input_embeddings(self, value: nn.Module) -> None:
        getattr(self, self.base_model_prefix).set_input_embeddings(value)

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        past_key_values: Any = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        head_mask: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        use_cache: bool | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        **kwargs: Any,
    ) -> Any:
        from transformers.modeling_outputs import TokenClassifierOutput

        return_dict = return_dict if return_dict is not None else self.config.use_return_dict
        given = dict(
            past_key_values=past_key_values,
            attention_mask=attention_mask,
            position_ids=position_ids,
            head_mask=head_mask,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            output_attentions=output_attentions,
            output_hidden_states=output_hidden_states,
            **kwargs,
        )
        # only what the backbone takes, and never a None it would not take either (GPT-J has token_type_ids)
        given = {k: v for k, v in given.items() if k in self._backbone_params and v is not None}
        outputs = getattr(self, self.base_model_prefix)(input_ids, return_dict=True, **given)
        logits = self.classifier(self.dropout(outputs[0]))
        loss = None
        if labels is not None:
            loss = nn.functional.cross_entropy(logits.view(-1, self.num_labels), labels.to(logits.device).view(-1))
        if not return_dict:
            output = (loss, logits, outputs.hidden_states, outputs.attentions)
            return tuple(v for v in output if v is not None)
        return TokenClassifierOutput(
            loss=loss, logits=logits, hidden_states=outputs.hidden_states, attentions=outputs.attentions
        )
