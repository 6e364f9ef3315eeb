"""The dropout gene reaches every dropout probability GPT-2, BERT and Llama read at run time."""

import pytest
from testing_utils import tiny_bert_classifier, tiny_gpt2, tiny_llama
from torch import nn

from clantune_hf.dropout import dropout_sites, mean_dropout, set_dropout


def test_gpt2_dropout_modules():
    model = tiny_gpt2(dropout=0.1)
    set_dropout(model, 0.3)
    modules = [m for m in model.modules() if isinstance(m, nn.Dropout)]
    assert modules and all(m.p == 0.3 for m in modules)


def test_bert_reads_its_dropout_modules():
    model = tiny_bert_classifier()
    assert mean_dropout(model) == pytest.approx(0.1)
    set_dropout(model, 0.25)
    attention = model.bert.encoder.layer[0].attention.self
    assert attention.dropout.p == 0.25  # what BERT's attention passes to the kernel
    assert model.dropout.p == 0.25


def test_llama_attention_dropout_attribute():
    model = tiny_llama(attention_dropout=0.0)
    sites = dropout_sites(model)
    assert sites and all(name == "attention_dropout" for _, name in sites)
    assert mean_dropout(model) == 0.0
    set_dropout(model, 0.2)
    assert all(layer.self_attn.attention_dropout == 0.2 for layer in model.model.layers)


def test_a_model_without_dropout_is_refused():
    with pytest.raises(ValueError, match="'dropout'"):
        mean_dropout(nn.Linear(2, 2))
