"""Prompt tuning / P-tuning in peftc: configs, inits (vs HF PEFT), the pass, training, ONNX export."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from conftest import captured, tiny_gpt2
from peftc.passes import PromptPass, insertion_pipeline
from peftc.passes.prompt import fill_model_fields
from safetensors.torch import load_file

from peftc.adapters import AdapterState
from peftc.config import PromptEncoderConfig, PromptTuningConfig, config_from_dict
from peftc.errors import AdapterMismatchError, ConfigError
from peftc.methods import get_method

# -- configs ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "cls,kwargs",
    [
        (PromptTuningConfig, {"num_virtual_tokens": 0}),
        (PromptTuningConfig, {"num_virtual_tokens": -3}),
        (PromptEncoderConfig, {"num_virtual_tokens": 0}),
        (PromptTuningConfig, {"num_virtual_tokens": "8"}),
        (PromptTuningConfig, {"prompt_tuning_init": "ZEROS"}),
        (PromptTuningConfig, {"prompt_tuning_init": "TEXT", "prompt_tuning_init_text": "hi"}),
        (PromptTuningConfig, {"prompt_tuning_init": "TEXT", "tokenizer_name_or_path": "/tok"}),
        (PromptTuningConfig, {"tokenizer_kwargs": {"use_fast": True}}),
        (PromptTuningConfig, {"num_transformer_submodules": 3}),
        (PromptEncoderConfig, {"encoder_reparameterization_type": "GRU"}),
        (PromptEncoderConfig, {"encoder_hidden_size": 0}),
        (PromptEncoderConfig, {"encoder_num_layers": 0}),
        (PromptEncoderConfig, {"encoder_dropout": 1.0}),
    ],
)
def test_bad_configs_raise_config_error(cls, kwargs):
    with pytest.raises(ConfigError):
        cls(**kwargs)


def test_hf_peft_configs_load_and_round_trip():
    peft = pytest.importorskip("peft")
    for hf in (
        peft.PromptTuningConfig(num_virtual_tokens=7, task_type="CAUSAL_LM", prompt_tuning_init="SAMPLE_VOCAB"),
        peft.PromptEncoderConfig(num_virtual_tokens=3, task_type="SEQ_CLS", encoder_reparameterization_type="LSTM"),
    ):
        data = json.loads(json.dumps(hf.to_dict(), default=str))
        data = {k: (v.split(".")[-1] if isinstance(v, str) and v.startswith(("PeftType.", "Prompt")) else v)
                for k, v in data.items()}  # fmt: skip
        ours = config_from_dict(data)
        assert ours.peft_type == data["peft_type"] and ours.num_virtual_tokens == hf.num_virtual_tokens
        assert config_from_dict(ours.to_dict()).to_dict() == ours.to_dict()
    assert get_method("PROMPT_TUNING").transforms_inputs and get_method("P_TUNING").transforms_inputs


# -- initialisation (no capture needed: the prompt module is built before re-capturing) ---------------


def _module(cfg, model):
    fill_model_fields(cfg, model.config)
    return PromptPass(cfg)._prompt_module(cfg, AdapterState(cfg), model)


def test_sample_vocab_init_copies_vocabulary_rows():
    model = tiny_gpt2()
    torch.manual_seed(5)
    module = _module(PromptTuningConfig(num_virtual_tokens=6, prompt_tuning_init="SAMPLE_VOCAB"), model)
    vocab = model.get_input_embeddings().weight
    prompt = module.embedding.weight
    assert prompt.shape == (6, 64) and prompt.requires_grad
    for row in prompt:
        assert (vocab - row).abs().amax(dim=1).min() == 0  # every row is some token's embedding
    # HF PEFT draws the same ids from the same seed (nn.Embedding init first, then randint)
    peft = pytest.importorskip("peft")
    from peft.tuners.prompt_tuning.model import PromptEmbedding

    torch.manual_seed(5)
    hf_cfg = peft.PromptTuningConfig(num_virtual_tokens=6, token_dim=64, num_transformer_submodules=1,
                                     prompt_tuning_init="SAMPLE_VOCAB")  # fmt: skip
    assert torch.equal(PromptEmbedding(hf_cfg, model.get_input_embeddings()).embedding.weight, prompt)


def test_random_init_is_standard_normal():
    module = _module(PromptTuningConfig(num_virtual_tokens=50), tiny_gpt2())
    w = module.embedding.weight
    assert w.shape == (50, 64) and 0.8 < float(w.std()) < 1.2


@pytest.fixture(scope="module")
def word_tokenizer(tmp_path_factory):
    """A 128-token word-level tokenizer saved locally (ids fit the tiny models' vocabulary)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["[UNK]", "[PAD]"] + [f"w{i}" for i in range(100)] + ["classify", "the", "sentiment", "of", "this"]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    root = tmp_path_factory.mktemp("tok")
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]").save_pretrained(root)
    return str(root)


@pytest.mark.parametrize("n", [3, 8])  # cut and repeated text
def test_text_init_equals_hf_peft(word_tokenizer, n):
    peft = pytest.importorskip("peft")
    from peft.tuners.prompt_tuning.model import PromptEmbedding

    model = tiny_gpt2()
    kwargs = dict(num_virtual_tokens=n, prompt_tuning_init="TEXT", tokenizer_name_or_path=word_tokenizer,
                  prompt_tuning_init_text="classify the sentiment of this")  # fmt: skip
    ours = _module(PromptTuningConfig(**kwargs), model).embedding.weight
    hf = PromptEmbedding(peft.PromptTuningConfig(**kwargs, token_dim=64, num_transformer_submodules=1),
                         model.get_input_embeddings()).embedding.weight  # fmt: skip
    assert torch.equal(ours, hf)
    vocab = model.get_input_embeddings().weight
    assert torch.equal(ours[0], vocab[102]) and torch.equal(ours[min(n, 5) % n], vocab[102])


def test_text_init_with_a_missing_tokenizer_is_a_clear_error(tmp_path):
    from peftc.errors import PeftcError

    cfg = PromptTuningConfig(num_virtual_tokens=3, prompt_tuning_init="TEXT", prompt_tuning_init_text="hi",
                             tokenizer_name_or_path=str(tmp_path / "nowhere"))  # fmt: skip
    with pytest.raises(PeftcError, match="tokenizer_name_or_path"):
        _module(cfg, tiny_gpt2())


def test_ptuning_encoders_match_hf_structure():
    peft = pytest.importorskip("peft")
    from peft.tuners.p_tuning.model import PromptEncoder

    for kind in ("MLP", "LSTM"):
        cfg = PromptEncoderConfig(num_virtual_tokens=4, encoder_reparameterization_type=kind, encoder_hidden_size=16)
        ours = _module(cfg, tiny_gpt2())
        hf = PromptEncoder(peft.PromptEncoderConfig(**{k: v for k, v in cfg.to_dict().items() if k != "peft_type"}))
        assert {k: v.shape for k, v in ours.named_parameters()} == {k: v.shape for k, v in hf.named_parameters()}
        hf.load_state_dict(dict(ours.named_parameters()))
        tokens = torch.arange(4).unsqueeze(0)
        assert torch.allclose(ours(1), hf(tokens), atol=1e-6)


# -- the pass ------------------------------------------------------------------------------------------


def test_pass_structure_and_negative_cases():
    program, _ = captured("bert", "seq-cls")
    before = program.input_names
    assert before == ["input_ids", "attention_mask", "token_type_ids"]
    cfg = PromptTuningConfig(num_virtual_tokens=4, task_type="SEQ_CLS", modules_to_save=["classifier", "score"])
    result = insertion_pipeline(cfg)(program)
    assert result.modified and program.history[0] == "PromptPass"
    assert program.input_names == before  # BERT's token_type_ids stay an input (zeros are prepended inside)
    trainable = {n for n, p in program.graph_module.named_parameters() if p.requires_grad}
    assert trainable == {"prompt.embedding.weight", "model.classifier.weight", "model.classifier.bias"}
    assert program.sites["prompt_encoder"].method == "PROMPT_TUNING"
    assert cfg.token_dim == 64 and cfg.num_layers == 2 and cfg.num_transformer_submodules == 1
    ids = torch.randint(1, 128, (2, 6))
    logits = program(ids, torch.ones_like(ids), torch.zeros_like(ids))
    assert logits.shape == (2, 3)
    saved = program.adapter.state_dict()
    assert set(saved) == {"prompt_embeddings", "base_model.classifier.weight", "base_model.classifier.bias"}

    with pytest.raises(ConfigError, match="first pass"):  # a prompt method re-captures: it must come first
        PromptPass(cfg)(program)

    other, _ = captured("bert", "seq-cls")
    bad = AdapterState(cfg, {"prompt_embeddings": torch.nn.Parameter(torch.zeros(5, 64))}, loaded=True)
    with pytest.raises(AdapterMismatchError, match="num_virtual_tokens=4"):
        PromptPass(cfg, bad)(other)
    empty = AdapterState(cfg, {}, loaded=True)
    with pytest.raises(AdapterMismatchError, match="prompt_embeddings"):
        PromptPass(cfg, empty)(other)


# -- training and export ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def lm_run(tmp_path_factory, word_tokenizer):
    """P-tuning (MLP) trained through peftc.train on a tiny GPT-2 saved with a local tokenizer."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from peftc.training import TrainConfig, train

    root = tmp_path_factory.mktemp("ptrain")
    torch.manual_seed(0)
    cfg = GPT2Config(n_layer=2, n_embd=32, n_head=4, n_positions=64, vocab_size=128, pad_token_id=1,
                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)  # fmt: skip
    GPT2LMHeadModel(cfg).save_pretrained(root / "base", safe_serialization=True)
    from transformers import AutoTokenizer

    AutoTokenizer.from_pretrained(word_tokenizer).save_pretrained(root / "base")
    lines = [" ".join(f"w{(3 * i + j) % 20}" for j in range(6)) for i in range(8)]
    (root / "data.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in lines))
    conf = root / "ptuning.json"
    conf.write_text(json.dumps({"peft_type": "P_TUNING", "num_virtual_tokens": 4, "encoder_hidden_size": 16}))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = train(TrainConfig(model=str(root / "base"), task="causal-lm", method="p-tuning", config_file=str(conf),
                                data=str(root / "data.jsonl"), out=str(root / "run"), max_steps=10, batch_size=8,
                                lr=3e-2, warmup_ratio=0.0, log_every=1, progress=False))  # fmt: skip
    return res


def test_training_lowers_the_loss_and_saves_hf_format(lm_run):
    records = [json.loads(x) for x in (lm_run.run_dir / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if r["type"] == "train"]
    assert len(losses) == 10 and losses[-1] < losses[0] - 0.03 and max(losses[1:]) < losses[0], losses
    saved = load_file(str(lm_run.adapter_dir / "adapter_model.safetensors"))
    assert list(saved) == ["prompt_embeddings"] and saved["prompt_embeddings"].shape == (4, 32)
    config = json.loads((lm_run.adapter_dir / "adapter_config.json").read_text())
    assert config["peft_type"] == "P_TUNING" and config["token_dim"] == 32 and config["inference_mode"] is True
    run = json.loads((lm_run.run_dir / "run.json").read_text())
    assert run["method"] == "p-tuning" and run["input_names"] == ["input_ids", "attention_mask"]


@pytest.mark.slow
def test_onnx_export_verifies_and_merge_is_refused(lm_run, tmp_path):
    pytest.importorskip("onnxruntime")
    from peftc.exporting import export

    out = export(lm_run.run_dir, out=tmp_path / "onnx", with_past=False)
    report = json.loads((out / "report.json").read_text())
    manifest = json.loads((out / "manifest.json").read_text())
    print(f"P-tuning ONNX export: ONNX Runtime vs torch max diff {report['max_abs_diff']:.3g}")
    assert report["verified"] and report["max_abs_diff"] <= 1e-4
    assert [i["name"] for i in manifest["inputs"]] == ["input_ids", "attention_mask"]
    with pytest.raises(ConfigError, match="merge"):
        export(lm_run.run_dir, out=tmp_path / "merged", merge=True)
