"""P-tuning: P = encoder(Emb(num_virtual_tokens, token_dim)), prepended to the token embeddings.

HF PEFT 0.21's ``PromptEncoderConfig``: an MLP (Lin→ReLU→Lin→ReLU→Lin) or a bidirectional LSTM then
Lin→ReLU→Lin over the virtual tokens' embeddings. The saved adapter holds the encoder's *output*
(``prompt_embeddings``); the shared machinery is :mod:`peftc.passes.prompt`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from peftc.config import PromptLearningConfig, help_field
from peftc.errors import ConfigError
from peftc.methods import register_method

from .prompt import prompt_method

__all__ = ["P_TUNING", "PROMPT_ENCODER_TYPES", "PromptEncoderConfig"]

#: HF PEFT's ``PromptEncoderReparameterizationType`` values.
PROMPT_ENCODER_TYPES = ("MLP", "LSTM")


@dataclass
class PromptEncoderConfig(PromptLearningConfig):
    """P-tuning: P = encoder(Emb(num_virtual_tokens, token_dim)), prepended like prompt tuning.

    MLP: Lin→ReLU→Lin→ReLU→Lin; LSTM: a bidirectional LSTM then Lin→ReLU→Lin. The saved adapter holds
    the encoder's *output* (``prompt_embeddings``), not the encoder.
    """

    peft_type: ClassVar[str] = "P_TUNING"

    encoder_reparameterization_type: str = help_field("Prompt encoder: MLP (recommended) or LSTM.", default="MLP")
    encoder_hidden_size: int | None = help_field("Hidden size of the encoder (default: token_dim).", default=None)
    encoder_num_layers: int = help_field("LSTM layers (ignored by MLP, which always has 3 linear layers).", default=2)
    encoder_dropout: float = help_field("Dropout between LSTM layers while training (unused by MLP).", default=0.0)

    def validate(self) -> None:
        super().validate()
        if self.encoder_reparameterization_type not in PROMPT_ENCODER_TYPES:
            raise ConfigError(
                f"encoder_reparameterization_type={self.encoder_reparameterization_type!r} is not one of "
                f"{', '.join(PROMPT_ENCODER_TYPES)}"
            )
        if self.encoder_hidden_size is not None and self.encoder_hidden_size <= 0:
            raise ConfigError(f"encoder_hidden_size must be a positive integer, got {self.encoder_hidden_size}")
        if self.encoder_num_layers <= 0:
            raise ConfigError(f"encoder_num_layers must be a positive integer, got {self.encoder_num_layers}")
        if not 0.0 <= self.encoder_dropout < 1.0:
            raise ConfigError(f"encoder_dropout must be in [0, 1), got {self.encoder_dropout}")

    def encoder_spec(self) -> dict[str, Any] | None:
        return {
            "encoder": self.encoder_reparameterization_type,
            "hidden": self.encoder_hidden_size,
            "num_layers": self.encoder_num_layers,
            "dropout": self.encoder_dropout,
        }


P_TUNING = register_method(prompt_method(PromptEncoderConfig, "P-tuning", "p-tuning"))
