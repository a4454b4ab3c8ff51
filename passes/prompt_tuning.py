"""Prompt tuning: ``inputs_embeds = [P; E(x)]`` with P ``[num_virtual_tokens, token_dim]`` trained directly.

HF PEFT 0.21's ``PromptTuningConfig`` and its ``PromptEmbedding`` init (RANDOM: N(0, 1); SAMPLE_VOCAB:
embeddings of random vocabulary tokens; TEXT: embeddings of ``prompt_tuning_init_text``). The insertion
machinery (the re-capture with virtual tokens, the on-disk keys, with-past exports as a constant cache
prefix) is shared with P-tuning in :mod:`peftc.passes.prompt`. Not mergeable: it changes the inputs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from peftc.config import PromptLearningConfig, help_field
from peftc.errors import ConfigError, ModelLoadError
from peftc.methods import register_method

from .prompt import prompt_method

__all__ = ["PROMPT_TUNING", "PROMPT_TUNING_INITS", "PromptTuningConfig"]

#: HF PEFT's ``PromptTuningInit`` values.
PROMPT_TUNING_INITS = ("RANDOM", "SAMPLE_VOCAB", "TEXT")


@dataclass
class PromptTuningConfig(PromptLearningConfig):
    """Prompt tuning: ``[P; E(x)]`` with P ``[num_virtual_tokens, token_dim]`` trained directly."""

    peft_type: ClassVar[str] = "PROMPT_TUNING"

    prompt_tuning_init: str = help_field(
        "Initial P: RANDOM (N(0,1)), SAMPLE_VOCAB (embeddings of random vocabulary tokens) or TEXT "
        "(embeddings of prompt_tuning_init_text, repeated or cut to num_virtual_tokens).",
        default="RANDOM",
    )
    prompt_tuning_init_text: str | None = help_field(
        "Text whose token embeddings initialise P (init TEXT).", default=None
    )
    tokenizer_name_or_path: str | None = help_field(
        "Local tokenizer directory used to tokenise prompt_tuning_init_text (init TEXT); never downloaded.",
        default=None,
    )
    tokenizer_kwargs: dict[str, Any] | None = help_field(
        "Extra AutoTokenizer.from_pretrained arguments (init TEXT).", default=None
    )

    def validate(self) -> None:
        super().validate()
        if self.prompt_tuning_init not in PROMPT_TUNING_INITS:
            raise ConfigError(
                f"prompt_tuning_init={self.prompt_tuning_init!r} is not one of {', '.join(PROMPT_TUNING_INITS)}"
            )
        if self.prompt_tuning_init == "TEXT":
            if not self.tokenizer_name_or_path:
                raise ConfigError(
                    "prompt_tuning_init='TEXT' needs tokenizer_name_or_path (a local tokenizer directory)"
                )
            if self.prompt_tuning_init_text is None:
                raise ConfigError("prompt_tuning_init='TEXT' needs prompt_tuning_init_text")
        elif self.tokenizer_kwargs:
            raise ConfigError(
                f"tokenizer_kwargs is only used with prompt_tuning_init='TEXT', not {self.prompt_tuning_init!r}"
            )

    def initial_token_ids(self, n: int, vocab_size: int) -> torch.Tensor | None:
        """RANDOM: none (N(0, 1)); SAMPLE_VOCAB: random ids; TEXT: the init text's ids, repeated or cut to ``n``."""
        if self.prompt_tuning_init == "RANDOM":
            return None
        if self.prompt_tuning_init == "SAMPLE_VOCAB":
            return torch.randint(0, vocab_size, (n,), dtype=torch.long)
        return _text_token_ids(self, n, vocab_size)


def _text_token_ids(config: PromptTuningConfig, n: int, vocab: int) -> torch.Tensor:
    from transformers import AutoTokenizer

    kwargs = dict(config.tokenizer_kwargs or {})
    kwargs.pop("trust_remote_code", None)  # as HF PEFT: never run code from a checkpoint
    try:
        tokenizer = AutoTokenizer.from_pretrained(config.tokenizer_name_or_path, local_files_only=True, **kwargs)
    except Exception as e:  # transformers raises OSError/ValueError/… for a missing or broken tokenizer
        raise ModelLoadError(
            f"cannot load the tokenizer tokenizer_name_or_path={config.tokenizer_name_or_path!r} for "
            f"prompt_tuning_init='TEXT' ({type(e).__name__}); give a local tokenizer directory"
        ) from e
    ids = list(tokenizer(config.prompt_tuning_init_text)["input_ids"])
    if not ids:
        raise ConfigError(f"prompt_tuning_init_text={config.prompt_tuning_init_text!r} tokenizes to no tokens")
    ids = (ids * math.ceil(n / len(ids)))[:n]
    if max(ids) >= vocab:
        raise ConfigError(
            f"the tokenizer {config.tokenizer_name_or_path} gives token id {max(ids)} but the model has only "
            f"{vocab} embeddings; use the model's own tokenizer"
        )
    return torch.tensor(ids, dtype=torch.long)


PROMPT_TUNING = register_method(prompt_method(PromptTuningConfig, "prompt tuning", "prompt-tuning"))
