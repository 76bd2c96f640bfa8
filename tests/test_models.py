"""The offline tiny/small model factory."""

from __future__ import annotations

import json

import pytest
import torch
from tokenizers import Tokenizer
from transformers import AutoModelForCausalLM, AutoTokenizer

from empg_envs.alfworld.env import AlfWorldEnv
from empg_rllib.cli import main
from empg_rllib.workflows import models

#: Every test here builds models (a BPE tokenizer and weights: ~20 s of one core each).
pytestmark = pytest.mark.heavy


def _params(model) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.fixture(scope="module")
def built_twice(tmp_path_factory):
    out = tmp_path_factory.mktemp("models")
    return models.make_model("tiny", out / "a", seed=3), models.make_model("tiny", out / "b", seed=3)


def test_tiny_model_loads_with_auto_classes(built_twice):
    path, _ = built_twice
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True)
    assert type(model).__name__ == "Qwen2ForCausalLM"
    assert model.config.tie_word_embeddings is False
    assert model.lm_head.weight.data_ptr() != model.model.embed_tokens.weight.data_ptr()
    assert 2_500_000 < _params(model) < 6_000_000
    assert model.config.eos_token_id == tokenizer.convert_tokens_to_ids("<|im_end|>")
    text = tokenizer.apply_chat_template([{"role": "user", "content": "go to desk 1"}], tokenize=False, add_generation_prompt=True)
    assert text == "<|im_start|>user\ngo to desk 1<|im_end|>\n<|im_start|>assistant\n"
    ids = tokenizer.encode("<think>x</think><action>go to desk 1</action>")
    assert tokenizer.decode(ids) == "<think>x</think><action>go to desk 1</action>"


def test_tokenizer_learned_environment_words(built_twice):
    tokenizer = AutoTokenizer.from_pretrained(built_twice[0], local_files_only=True)
    # Words of the environments' text are single tokens (merged by BPE), unlike random letters;
    # every ALFWorld name is, whether or not the corpus episodes showed it (the env's lexicon).
    for word in (" search", " observation", " taken", *(f" {name}" for name in AlfWorldEnv.lexicon)):
        assert len(tokenizer.encode(word)) == 1, word
    assert len(tokenizer.encode(" qzxvkj")) >= 3


def test_loaded_tokenizer_splits_text_as_trained(built_twice):
    # AutoTokenizer loads a qwen2 model directory as a Qwen2Tokenizer with Qwen2's own
    # pre-tokenizer; the merges must have been learned on the same pieces.
    trained = Tokenizer.from_file(str(built_twice[0] / "tokenizer.json"))
    loaded = AutoTokenizer.from_pretrained(built_twice[0], local_files_only=True)
    assert type(loaded).__name__ == "Qwen2Tokenizer"
    text = (
        "Your task is to: put some saltshaker on drawer.\n\nCurrent observation (step 12): "
        "On the countertop 2, you see a bowl 1, and a apple 3.\nsystem\n<action>go to desk 10</action>"
    )
    assert loaded.encode(text, add_special_tokens=False) == trained.encode(text).ids


def test_build_is_deterministic_for_a_seed(built_twice):
    a, b = built_twice
    assert json.loads((a / "tokenizer.json").read_text()) == json.loads((b / "tokenizer.json").read_text())
    ma = AutoModelForCausalLM.from_pretrained(a, local_files_only=True).state_dict()
    mb = AutoModelForCausalLM.from_pretrained(b, local_files_only=True).state_dict()
    assert all(torch.equal(ma[k], mb[k]) for k in ma)


def test_seed_changes_weights(tmp_path, built_twice):
    other = models.make_model("tiny", tmp_path / "c", seed=4)
    wa = AutoModelForCausalLM.from_pretrained(built_twice[0], local_files_only=True).lm_head.weight
    wc = AutoModelForCausalLM.from_pretrained(other, local_files_only=True).lm_head.weight
    assert not torch.equal(wa, wc)


def test_small_size_has_about_27m_parameters(built_twice):
    tokenizer = AutoTokenizer.from_pretrained(built_twice[0], local_files_only=True)
    model = models.build_model("small", tokenizer, seed=0)
    assert 24_000_000 < _params(model) < 31_000_000


def test_resolve_model_specs(tmp_path, built_twice):
    assert models.resolve_model(str(built_twice[0])) == built_twice[0]
    with pytest.raises(FileNotFoundError, match="neither"):
        models.resolve_model(str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="seed=N"):
        models.resolve_model("tiny:bad")
    with pytest.raises(ValueError, match="unknown model size"):
        models.make_model("huge", tmp_path / "x")


def test_cli_make_model(tmp_path, capsys):
    assert main(["make-model", "--size", "tiny", "--out", str(tmp_path / "m"), "--seed", "1"]) == 0
    assert "built tiny model" in capsys.readouterr().out
    assert json.loads((tmp_path / "m" / "empg_model.json").read_text())["seed"] == 1
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging dir left
