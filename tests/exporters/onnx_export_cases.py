"""Shared export artifacts for the exporter tests, built once per test session (``export_cases`` fixture).

ONNX export of even a tiny model takes ~10 s on two cores, so the exporter test files share one
:class:`ExportCases` (a session-scoped fixture in ``conftest.py``, under a pytest temporary
directory): per family a base model directory (``save_pretrained``), a run directory written
without the training stage (``AdapterState.save`` + ``run.json``) holding a non-identity LoRA
adapter (B and, for seq-cls, the head perturbed), and its merged and unmerged exports. The
reference is HF PEFT (``PeftModel.from_pretrained`` on the saved adapter), never peftc itself.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import pytest
import torch
from conftest import tiny_bert, tiny_gpt2, tiny_llama

ATOL = 1e-4
CAPTURE_SHAPE = [2, 8]  # peftc.program.example_inputs' default
ID2LABEL = {0: "negative", 1: "neutral", 2: "positive"}

#: family -> (task, model factory, HF auto class)
SPECS = {
    "gpt2": ("causal-lm", tiny_gpt2, "AutoModelForCausalLM"),
    "llama": ("causal-lm", tiny_llama, "AutoModelForCausalLM"),
    "bert": ("seq-cls", tiny_bert, "AutoModelForSequenceClassification"),
}
#: GPT-2 runs in the default suite; the other families are slow (each costs ~30 s of exports).
FAMILY_PARAMS = [
    pytest.param("gpt2", id="gpt2-causal-lm"),
    pytest.param("llama", id="llama-gqa-causal-lm", marks=pytest.mark.slow),
    pytest.param("bert", id="bert-seq-cls", marks=pytest.mark.slow),
]

T = TypeVar("T")


class ExportCases:
    """This session's shared artifacts, made on first use under ``root`` and kept for the session.

    Args:
        root: a directory of the session (``tmp_path_factory``); pytest removes it, not this class.
    """

    def __init__(self, root: Path):
        self.root = Path(root)
        self._made: dict[Any, Any] = {}

    def scratch(self, name: str) -> Path:
        """A fresh directory under the session's root."""
        return Path(tempfile.mkdtemp(prefix=f"{name}-", dir=self.root))

    def memo(self, key: Any, make: Callable[[], T]) -> T:
        """``make()`` once per session and ``key`` (a failure or skip is not kept: the next call retries)."""
        if key not in self._made:
            self._made[key] = make()
        return self._made[key]

    def build(self, family: str) -> Built:
        """Base model dir + a run dir with a non-identity LoRA adapter made by peftc's passes."""
        return self.memo(("build", family), lambda: _build(self, family))

    def export(self, family: str, merge: bool) -> Path:
        """``peftc export`` of the family's run, merged or not (a plain graph: KV-cache graphs are test_with_past's)."""
        return self.memo(("export", family, merge), lambda: _export(self.build(family), merge))

    def base_onnx(self, family: str) -> Path:
        """The base model (no adapter) exported the same way as the adapted programs."""
        return self.memo(("base-onnx", family), lambda: _base_onnx(self, family))

    def hf_peft(self, family: str) -> torch.nn.Module:
        """HF PEFT's model of the family's saved adapter: the reference."""
        return self.memo(("hf-peft", family), lambda: _hf_peft(self.build(family)))


#: This session's :class:`ExportCases`, set by the ``export_cases`` fixture (tests/conftest.py), for test
#: modules that use the module-level helpers below; such a module requests the fixture with
#: ``pytestmark = pytest.mark.usefixtures("export_cases")``.
_SESSION: ExportCases | None = None


def session_cases() -> ExportCases:
    if _SESSION is None:
        raise RuntimeError('request the export_cases fixture: pytestmark = pytest.mark.usefixtures("export_cases")')
    return _SESSION


def scratch(name: str) -> Path:
    """A fresh directory under this session's root."""
    return session_cases().scratch(name)


def build(family: str) -> Built:
    """This session's base and run directories of ``family`` (:meth:`ExportCases.build`)."""
    return session_cases().build(family)


def base_onnx(family: str) -> Path:
    """This session's base-model ONNX export of ``family`` (:meth:`ExportCases.base_onnx`)."""
    return session_cases().base_onnx(family)


@dataclass
class Built:
    """One family's base model, run directory and (lazily) its exports."""

    family: str
    task: str
    auto_class: str
    base_dir: Path
    run_dir: Path
    cases: ExportCases

    @property
    def adapter_dir(self) -> Path:
        return self.run_dir / "adapter"

    def export(self, merge: bool) -> Path:
        return self.cases.export(self.family, merge)

    def hf_base(self) -> torch.nn.Module:
        import transformers

        auto = getattr(transformers, self.auto_class)
        return auto.from_pretrained(self.base_dir, use_safetensors=True).eval()

    def hf_peft(self) -> torch.nn.Module:
        return self.cases.hf_peft(self.family)


def _build(cases: ExportCases, family: str) -> Built:
    from peftc.passes import insertion_pipeline

    from peftc.config import LoraConfig
    from peftc.program import capture

    task, factory, auto_class = SPECS[family]
    root = cases.scratch(family)
    model = factory()
    base_dir = root / "base"
    model.save_pretrained(base_dir, safe_serialization=True)
    save_tokenizer(base_dir)

    program = capture(factory(), task, mode="eval")
    seq_cls = task == "seq-cls"
    config = LoraConfig(
        r=4,
        lora_alpha=8,
        task_type="SEQ_CLS" if seq_cls else "CAUSAL_LM",
        modules_to_save=["classifier", "score"] if seq_cls else None,
    )
    insertion_pipeline(config)(program)
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for key, tensor in sorted(program.adapter.tensors.items()):
            if "lora_B" in key:  # B = 0 at init would make the adapter the identity
                tensor.copy_(torch.randn(tensor.shape, generator=gen) * 0.1)
            elif "lora_A" not in key:  # the seq-cls head copy
                tensor.add_(torch.randn(tensor.shape, generator=gen) * 0.2)
    run_dir = root / "run"
    program.adapter.save(run_dir / "adapter")
    run = {"task": task, "model": {"spec": str(base_dir), "source": str(base_dir)}}
    if seq_cls:
        run["id2label"] = {str(k): v for k, v in ID2LABEL.items()}
    (run_dir / "run.json").write_text(json.dumps(run))
    return Built(family, task, auto_class, base_dir, run_dir, cases)


def save_tokenizer(directory: Path) -> None:
    """A WordPiece tokenizer over the tiny models' 128 ids, so export has tokenizer files to copy."""
    from transformers import BertTokenizerFast

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    vocab = directory / "vocab.txt"
    vocab.write_text("\n".join(specials + [f"w{i}" for i in range(128 - len(specials))]) + "\n")
    BertTokenizerFast(vocab_file=str(vocab)).save_pretrained(directory)


def _export(built: Built, merge: bool) -> Path:
    from peftc.exporting import export

    out = built.run_dir.parent / f"export-{'merged' if merge else 'unmerged'}"
    return export(built.run_dir, merge=merge, out=out, with_past=False)  # KV-cache graphs: test_with_past.py


def _base_onnx(cases: ExportCases, family: str) -> Path:
    from peftc.exporters.onnx import export_program_onnx

    from peftc.models import load_model
    from peftc.program import capture

    built = cases.build(family)
    loaded = load_model(built.base_dir, built.task)
    path = cases.scratch(f"{family}-base-onnx") / "model.onnx"
    export_program_onnx(capture(loaded.model, built.task, mode="eval"), path)
    return path


def _hf_peft(built: Built) -> torch.nn.Module:
    from peft import PeftModel

    return PeftModel.from_pretrained(built.hf_base(), built.adapter_dir).eval()


def make_inputs(task: str, names: list[str], batch: int, seq: int, pads: list[int], seed: int = 0):
    """Token ids / mask / positions keyed by name; row i left-padded by pads[i] (pad id 0)."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 128, (batch, seq), generator=gen)
    mask = torch.ones(batch, seq, dtype=torch.long)
    for row, pad in enumerate(pads):
        mask[row, :pad] = 0
        ids[row, :pad] = 0
    tensors = {
        "input_ids": ids,
        "attention_mask": mask,
        "token_type_ids": torch.zeros_like(ids),
        "position_ids": (mask.cumsum(-1) - 1).clamp(min=0),
    }
    return {n: tensors[n] for n in names}


#: held-out (batch, seq, left pads) per comparison: none equals the capture example's shape
TEST_SHAPES = [(3, 9, [3, 0, 1]), (1, 5, [0]), (4, 3, [0, 0, 2, 0])]


def ort_logits(path: Path, inputs: dict[str, torch.Tensor]) -> np.ndarray:
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feeds = {i.name: inputs[i.name].numpy() for i in session.get_inputs()}
    return session.run(["logits"], feeds)[0]


def hf_logits(model: torch.nn.Module, inputs: dict[str, torch.Tensor]) -> np.ndarray:
    with torch.no_grad():
        return model(**inputs).logits.float().numpy()


def onnx_input_names(path: Path) -> list[str]:
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    inits = {i.name for i in model.graph.initializer}
    return [i.name for i in model.graph.input if i.name not in inits]


def max_diff(task: str, a: np.ndarray, b: np.ndarray, inputs: dict[str, torch.Tensor]) -> float:
    """Max |a - b| at real positions (causal-lm) or over every row (seq-cls)."""
    assert a.shape == b.shape, (a.shape, b.shape)
    rows = inputs["attention_mask"].bool().numpy() if task == "causal-lm" else np.ones(a.shape[0], dtype=bool)
    return float(np.abs(a[rows].astype(np.float64) - b[rows].astype(np.float64)).max())
