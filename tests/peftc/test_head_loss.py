"""The LM head fused into the training loss (peftc.training.head_loss) equals the unfused loss and gradients."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from peftc.passes import insertion_pipeline

from peftc.config import config_from_dict
from peftc.program import capture
from peftc.tasks import get_task
from peftc.training import head_loss
from peftc.training.head_loss import HeadCrossEntropy, split_head


def _program(model, task, peft):
    prog = capture(model, task, mode="train")
    insertion_pipeline(config_from_dict(peft, source="test"))(prog)
    torch.manual_seed(1)
    for p in prog.parameters(trainable=True):
        torch.nn.init.normal_(p, std=0.1)  # not the identity
    return prog


def _gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=101, n_positions=64,
                                      resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0))  # fmt: skip


def _bert_tokens():
    from transformers import BertConfig, BertForTokenClassification

    torch.manual_seed(0)
    cfg = BertConfig(num_hidden_layers=2, hidden_size=32, intermediate_size=64, num_attention_heads=4, vocab_size=101,
                     num_labels=5, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)  # fmt: skip
    return BertForTokenClassification(cfg)


def _t5():
    from transformers import T5Config, T5ForConditionalGeneration

    torch.manual_seed(0)
    return T5ForConditionalGeneration(T5Config(num_layers=2, d_model=32, d_ff=64, num_heads=4, d_kv=8,
                                               vocab_size=101, dropout_rate=0.0, decoder_start_token_id=0))  # fmt: skip


LORA = {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "lora_dropout": 0.0, "target_modules": None}


def _batch(prog, left: bool):
    torch.manual_seed(5)
    ids = torch.randint(1, 101, (3, 9))
    mask = torch.ones_like(ids)
    pad = torch.arange(9) < 3 if left else torch.arange(9) >= 6
    mask[1] = (~pad).long()
    labels = ids.masked_fill(mask == 0, -100)
    batch = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    if "position_ids" in prog.input_names:
        batch["position_ids"] = (mask.cumsum(-1) - 1).clamp(min=0)
    if "token_type_ids" in prog.input_names:
        batch["token_type_ids"] = torch.zeros_like(ids)
    if prog.task.name == "token-cls":
        batch["labels"] = (ids % 5).masked_fill(mask == 0, -100)
    if "decoder_input_ids" in prog.input_names:
        batch["decoder_input_ids"] = torch.randint(1, 101, (3, 7))
        batch["labels"] = torch.randint(1, 101, (3, 7)).masked_fill(torch.arange(7) >= 5, -100)
    return batch


def _loss_and_grads(loss_of, batch, params):
    for p in params:
        p.grad = None
    loss = loss_of(batch)
    loss.backward()
    return float(loss), [p.grad.clone() for p in params]


@pytest.mark.parametrize(
    ("make", "task", "peft"),
    [
        (_gpt2, "causal-lm", {**LORA, "target_modules": ["c_attn"], "task_type": "CAUSAL_LM"}),
        (_gpt2, "causal-lm", {"peft_type": "PROMPT_TUNING", "num_virtual_tokens": 3, "task_type": "CAUSAL_LM"}),
        (_t5, "seq2seq", {**LORA, "target_modules": ["q", "v"], "task_type": "SEQ_2_SEQ_LM"}),
        (_bert_tokens, "token-cls", {**LORA, "target_modules": ["query", "value"], "task_type": "TOKEN_CLS"}),
    ],
    ids=["gpt2-lora", "gpt2-prompt-tuning", "t5-lora", "bert-token-cls-lora"],
)
@pytest.mark.parametrize("left", [False, True], ids=["right-padded", "left-padded"])
def test_fused_head_loss_equals_the_unfused_loss(make, task, peft, left, monkeypatch):
    prog = _program(make(), task, peft)
    fused = split_head(prog.graph_module, prog.task)
    assert fused is not None, "the program ends in its LM head"
    body, loss = fused
    monkeypatch.setattr(head_loss, "CHUNK_ELEMENTS", loss.weight.shape[0] * 4)  # at most 4 rows a chunk: several
    names = prog.input_names
    params = prog.parameters(trainable=True)
    batch = _batch(prog, left)
    assert loss.rows_per_chunk(11) == 4 and loss.rows_per_chunk(4) == 4  # 11 rows: chunks of 4, 4, 3
    want, want_grads = _loss_and_grads(lambda b: prog.task.loss(prog.forward_batch(b), b), batch, params)
    got, got_grads = _loss_and_grads(lambda b: loss(body(*(b[n] for n in names)), b), batch, params)
    assert got == pytest.approx(want, rel=1e-6)
    for a, b in zip(want_grads, got_grads, strict=True):
        assert a.abs().max() > 0
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-7)
    assert prog.graph_module.graph.find_nodes(op="call_function", target=torch.ops.aten.linear.default)[-1].users, (
        "the captured program itself keeps its head"
    )


def test_head_cross_entropy_gradients_of_a_trained_head():
    """A trained head (modules_to_save on lm_head): the weight's and bias's gradients too, in chunks."""
    torch.manual_seed(0)
    h = torch.randn(11, 8, requires_grad=True)
    w = torch.randn(13, 8, requires_grad=True)
    b = torch.randn(13, requires_grad=True)
    y = torch.randint(0, 13, (11,))
    (F.cross_entropy(F.linear(h, w, b), y) * 3.0).backward()
    want = [t.grad.clone() for t in (h, w, b)]
    for t in (h, w, b):
        t.grad = None
    (HeadCrossEntropy.apply(h, w, b, y, 4) * 3.0).backward()  # chunks of 4, 4, 3 rows
    for a, g in zip(want, (h.grad, w.grad, b.grad), strict=True):
        torch.testing.assert_close(g, a, rtol=1e-5, atol=1e-6)


def test_programs_without_a_plain_linear_head_are_not_fused():
    from transformers import BertConfig, BertForSequenceClassification

    cfg = BertConfig(num_hidden_layers=1, hidden_size=32, intermediate_size=64, num_attention_heads=4, vocab_size=50)
    prog = capture(BertForSequenceClassification(cfg), "seq-cls", mode="train")
    assert split_head(prog.graph_module, prog.task) is None  # a classifier: nothing to gain
    lora_head = _program(_gpt2(), "causal-lm", {**LORA, "target_modules": ["lm_head"], "task_type": "CAUSAL_LM"})
    assert split_head(lora_head.graph_module, get_task("causal-lm")) is None  # the head's output is not linear(h, W)
