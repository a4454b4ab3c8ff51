"""AdapterState: an adapter as data, in HF PEFT's on-disk format.

An adapter is a method config plus tensors named exactly as HF PEFT names them in
``adapter_model.safetensors`` (``base_model.model.<module>.lora_A.weight``, trainable copies of
base parameters as ``base_model.model.<module>.<param>``). It lives apart from any graph: an
insertion pass creates it (fresh init) or binds it (loaded or trained) into a program, and the
program's adapter parameters *are* the state's tensors, so training updates the state in place.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from peftc.config import MethodConfig, config_from_dict
from peftc.errors import AdapterFormatError, ConfigError
from peftc.files import atomic_dir, read_json

__all__ = ["BUFFER_SUFFIXES", "CONFIG_FILE", "WEIGHTS_FILE", "AdapterState", "graph_path", "is_buffer_key", "peft_key"]

logger = logging.getLogger(__name__)

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
_PEFT_PREFIX = "base_model."


def peft_key(module_name: str, suffix: str) -> str:
    """HF PEFT's saved key for ``suffix`` (``lora_A.weight``) of module ``module_name``."""
    return f"{_PEFT_PREFIX}model.{module_name}.{suffix}"


def graph_path(key: str) -> str:
    """Where the tensor of an HF PEFT key lives inside a captured graph module."""
    return key.removeprefix(_PEFT_PREFIX)


@dataclass
class AdapterState:
    """A method config and its tensors, keyed as HF PEFT saves them."""

    config: MethodConfig
    tensors: dict[str, nn.Parameter] = field(default_factory=dict)
    name: str = "default"
    loaded: bool = False  # True when read from disk: missing tensors are then an error, not a fresh init
    #: Maps this state to the tensors written to disk when they are not ``tensors`` themselves
    #: (P-tuning trains an encoder but saves its output); set by the method's pass.
    to_saved: Callable[[AdapterState], dict[str, torch.Tensor]] | None = field(default=None, repr=False)

    def state_dict(self) -> dict[str, torch.Tensor]:
        tensors = self.to_saved(self) if self.to_saved is not None else self.tensors
        return {k: t.detach().contiguous() for k, t in sorted(tensors.items())}

    def num_parameters(self) -> int:
        return sum(t.numel() for t in self.tensors.values())

    def save(self, directory: str | Path, force: bool = False) -> Path:
        """Write ``adapter_config.json`` and ``adapter_model.safetensors`` (atomically)."""
        with atomic_dir(directory, force=force) as tmp:
            self.write_into(tmp)
        return Path(directory)

    def write_into(self, directory: str | Path) -> None:
        """Write the two adapter files into an existing directory (no atomicity of its own)."""
        directory = Path(directory)
        self.config.save(directory)
        save_file(self.state_dict(), str(directory / WEIGHTS_FILE), metadata={"format": "pt"})

    @classmethod
    def load(cls, directory: str | Path, name: str | None = None) -> AdapterState:
        """Read an adapter directory written by peftc or HF PEFT."""
        directory = Path(directory)
        if not directory.is_dir():
            raise AdapterFormatError(f"adapter directory {directory} does not exist")
        config_path = directory / CONFIG_FILE
        if not config_path.is_file():
            raise AdapterFormatError(f"{directory} has no {CONFIG_FILE}; is it an HF PEFT adapter directory?")
        data = read_json(config_path, "adapter config", AdapterFormatError)
        try:
            config = config_from_dict(data, source=str(config_path))
        except ConfigError as e:
            raise AdapterFormatError(str(e)) from e
        weights = directory / WEIGHTS_FILE
        if not weights.is_file():
            if (directory / "adapter_model.bin").is_file():
                raise AdapterFormatError(
                    f"{directory} holds adapter_model.bin (a pickle), which peftc never loads; "
                    "re-save it with HF PEFT's save_pretrained(safe_serialization=True)"
                )
            raise AdapterFormatError(f"{directory} has no {WEIGHTS_FILE}")
        try:
            raw = load_file(str(weights))
        except (SafetensorError, OSError, ValueError) as e:
            raise AdapterFormatError(f"{weights} is corrupt or truncated ({e}); re-save the adapter") from e
        for key, value in raw.items():
            _check_tensor(weights, key, value)
        tensors = {k: v if is_buffer_key(k) else nn.Parameter(v, requires_grad=False) for k, v in raw.items()}
        return cls(config=config, tensors=tensors, name=name or directory.name, loaded=True)

    def subset(self, keep: Callable[[str], bool]) -> AdapterState:
        """A view of the tensors whose HF PEFT key passes ``keep``: the same Parameters, not copies.

        For a program that holds only part of the model (the encoder or the decoder graph of a
        seq2seq export): binding the whole state there fails, rightly, on the keys of the modules
        the graph does not call (``AdapterMismatchError``); each part binds its own subset instead,
        and the caller checks that the subsets cover the state. The view is never saved (save the
        state it came from).
        """
        tensors = {k: t for k, t in self.tensors.items() if keep(k)}
        return AdapterState(config=self.config, tensors=tensors, name=self.name, loaded=self.loaded)

    def trainable_(self, on: bool = True) -> AdapterState:
        for key, t in self.tensors.items():
            t.requires_grad_(on and t.is_floating_point() and not is_buffer_key(key))
        return self


#: Buffers a saved module carries (BatchNorm statistics, as HF PEFT saves ``modules_to_save``): never trained.
BUFFER_SUFFIXES = (".running_mean", ".running_var", ".num_batches_tracked")


def is_buffer_key(key: str) -> bool:
    """Whether an adapter key is a saved module's buffer (a BatchNorm statistic), not a trained tensor."""
    return key.endswith(BUFFER_SUFFIXES)


def _check_tensor(path: Path, key: str, value: torch.Tensor) -> None:
    """An adapter tensor must be floating point and finite: name the one that is not, before any use."""
    if key.endswith(".num_batches_tracked") and not value.is_floating_point() and value.ndim == 0:
        return  # a BatchNorm's step counter, saved with its module as HF PEFT saves it
    if not value.is_floating_point():
        raise AdapterFormatError(
            f"{path}: tensor {key} has dtype {str(value.dtype).removeprefix('torch.')}; adapters are floating point "
            "(re-save the adapter from its training run)"
        )
    finite = torch.isfinite(value)
    if not bool(finite.all()):
        bad = value[~finite]
        kind = "NaN" if bool(torch.isnan(bad).any()) else "inf"
        raise AdapterFormatError(
            f"{path}: tensor {key} holds {int((~finite).sum())} {kind} value(s) (shape {list(value.shape)}); "
            "the training run diverged or the file is damaged — retrain or use an earlier checkpoint"
        )
