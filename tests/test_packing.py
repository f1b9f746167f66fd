"""--packing: padding-free batches (DataCollatorWithFlattening) train on exactly what padded batches do.

The packed row carries no attention mask; transformers rebuilds a block-diagonal causal mask from the
position ids that restart at 0 for every example. These tests check that numerically, for the attention
implementations the Trainer can pick on CPU. transformers does this only without a KV cache: the Trainer
sets `model.config.use_cache = args.use_cache` (False), so the forward passes here run with use_cache=False;
with a cache the packed row silently attends across examples (checked below, so a library change shows).
"""
from functools import partial
from types import SimpleNamespace

import pytest
import torch
from transformers import AutoModelForCausalLM

import train
import utils
from utils import load_records, tokenize_supervised

RECORDS = load_records(utils.GENMEDGPT_PATH)[:4] + [
    {"instruction": "Say hi.", "input": "", "output": "Hi."},  # very short next to long ones: lots of padding
    {"instruction": "Name a fruit.", "input": "red", "output": "An apple."},
]


def collators(tokenizer):
    """(padded, packed as train.py packs: logits only where a label is)."""
    padded = train.make_collator(SimpleNamespace(packing=False), tokenizer)
    packed = train.make_collator(SimpleNamespace(packing=True), tokenizer)
    return padded, packed


PLAIN_PACKED = partial(utils.collate_packed, logits_only_where_supervised=False)  # every position's logits


def model_from(path, attn):
    """attn: a transformers implementation, or utils.PACKED_ATTENTION (what train.py --packing switches to)."""
    packed = attn == utils.PACKED_ATTENTION
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="sdpa" if packed else attn)
    if packed:
        assert utils.use_packed_attention(model) == utils.PACKED_ATTENTION
    model.config.use_cache = False  # what the Trainer does (TrainingArguments.use_cache defaults to False)
    return model.eval()


ATTENTIONS = ["sdpa", "eager", utils.PACKED_ATTENTION]


@pytest.fixture(scope="module")
def examples(tokenizer):
    return tokenize_supervised(RECORDS, tokenizer, 256)


def test_packed_batch_is_one_row_with_restarting_positions(tokenizer, examples):
    _, packed = collators(tokenizer)
    batch = packed(examples)
    total = sum(len(e["input_ids"]) for e in examples)
    assert "attention_mask" not in batch  # the mask comes from position_ids
    assert batch["input_ids"].shape == batch["labels"].shape == batch["position_ids"].shape == (1, total)
    starts = (batch["position_ids"][0] == 0).nonzero().flatten().tolist()
    assert starts == [0] + list(torch.tensor([len(e["input_ids"]) for e in examples]).cumsum(0)[:-1].tolist())
    # The first token of every example is never a target: no loss across the seam between examples.
    assert all(batch["labels"][0, s] == utils.IGNORE_INDEX for s in starts)
    supervised = sum(sum(t != utils.IGNORE_INDEX for t in e["labels"]) for e in examples)
    assert int((batch["labels"] != utils.IGNORE_INDEX).sum()) == supervised
    # The LM head runs only where the next token is a target, and those targets are exactly the labels.
    assert batch["logits_to_keep"].dtype == torch.bool and int(batch["logits_to_keep"].sum()) == supervised
    assert batch["shift_labels"].tolist() == [t for t in batch["labels"][0, 1:].tolist() if t != utils.IGNORE_INDEX]


@pytest.mark.parametrize("plain", [False, True], ids=["supervised-logits", "all-logits"])
@pytest.mark.parametrize("attn", ATTENTIONS)
def test_packed_and_padded_give_same_loss_and_gradients(tokenizer, tiny_model_dir, examples, attn, plain):
    padded, packed = collators(tokenizer)
    packed = PLAIN_PACKED if plain else packed
    losses, grads = [], []
    for collate in (padded, packed):
        model = model_from(tiny_model_dir, attn)
        out = model(**collate(examples))
        out.loss.backward()
        losses.append(out.loss.detach())
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-4, atol=1e-6)


def test_same_loss_on_the_embedded_default(tokenizer, embedded_model_dir, examples):
    padded, packed = collators(tokenizer)
    model = model_from(embedded_model_dir, "sdpa")
    with torch.no_grad():
        loss_padded = model(**padded(examples)).loss
        loss_packed = model(**packed(examples)).loss
        utils.use_packed_attention(model)
        loss_packed_attention = model(**packed(examples)).loss
        loss_padded_packed_attention = model(**padded(examples)).loss  # no boundaries: plain SDPA with the mask
    assert 0.1 < float(loss_padded) < 20
    torch.testing.assert_close(loss_packed, loss_padded, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(loss_packed_attention, loss_padded, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(loss_padded_packed_attention, loss_padded, rtol=1e-5, atol=1e-6)


def test_packed_attention_runs_one_attention_per_example(tokenizer, tiny_model_dir, examples, monkeypatch):
    calls = []
    original = torch.nn.functional.scaled_dot_product_attention

    def counting(query, key, value, **kwargs):
        calls.append((query.shape[2], kwargs.get("attn_mask") is None, kwargs.get("is_causal")))
        return original(query, key, value, **kwargs)

    batch = collators(tokenizer)[1](examples)
    lengths = [len(e["input_ids"]) for e in examples]
    assert batch["cu_seq_lens_q"].tolist() == [0] + torch.tensor(lengths).cumsum(0).tolist()
    model = model_from(tiny_model_dir, utils.PACKED_ATTENTION)
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", counting)
    with torch.no_grad():
        model(**batch)
    layers = model.config.num_hidden_layers
    assert calls == [(n, True, True) for n in lengths] * layers  # each example alone, causal, no mask


def test_packed_attention_keeps_flash_and_eager(tiny_model_dir):
    model = model_from(tiny_model_dir, "eager")
    assert utils.use_packed_attention(model) == "eager" and model.config._attn_implementation == "eager"


@pytest.mark.parametrize("attn", ATTENTIONS)
def test_no_attention_across_examples_in_a_packed_row(tokenizer, tiny_model_dir, examples, attn):
    packed = PLAIN_PACKED  # logits at every position, to compare them
    model = model_from(tiny_model_dir, attn)
    a, b, c = examples[0], examples[1], examples[2]
    changed_a = dict(a, input_ids=[(t * 7 + 3) % len(tokenizer) for t in a["input_ids"]])
    n_a, n_b = len(a["input_ids"]), len(b["input_ids"])
    with torch.no_grad():
        logits = model(**packed([a, b, c])).logits[0]
        logits_changed = model(**packed([changed_a, b, c])).logits[0]
        alone = model(input_ids=torch.tensor([b["input_ids"]])).logits[0]
    assert not torch.allclose(logits[:n_a], logits_changed[:n_a])  # A's own logits did change
    torch.testing.assert_close(logits_changed[n_a:], logits[n_a:], rtol=0, atol=0)  # B and C did not
    torch.testing.assert_close(logits[n_a:n_a + n_b], alone, rtol=1e-5, atol=1e-5)  # B packed == B alone


def test_training_runs_without_kv_cache_which_packing_needs(tokenizer, tiny_model_dir, examples):
    _, _, args = train.parse_args(["--output_dir", "unused", "--packing", "True", "--use_cache", "True"])
    assert args.use_cache is False  # --packing turns it off
    _, _, args = train.parse_args(["--output_dir", "unused"])
    assert args.use_cache is False
    packed = PLAIN_PACKED
    model = model_from(tiny_model_dir, "sdpa")
    a, b = examples[0], examples[1]
    n_a = len(a["input_ids"])
    with torch.no_grad():
        with_cache = model(**packed([a, b]), use_cache=True).logits[0, n_a:]
        alone = model(input_ids=torch.tensor([b["input_ids"]])).logits[0]
    assert not torch.allclose(with_cache, alone, atol=1e-3)  # the trap: a cache disables the packed mask
