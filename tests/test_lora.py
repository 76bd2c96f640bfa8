"""LoRA on the learner: only adapters train, sync and checkpoint; the env runner merges them into
its own base weights; the KL reference is the same model with its adapters off."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from empg_rllib.algorithm.rl_module import LORA_SUFFIXES
from empg_rllib.config.loading import validate
from empg_rllib.config.schema import ConfigError
from empg_rllib.core.scoring import response_scores
from empg_rllib.workflows import training
from tests.helpers import LEARNER, build, k3_by_hand, synthetic_batch, train_batch

LORA = {"lora": {"r": 4, "alpha": 8.0}}
#: The tiny model has 4 layers of 7 adapted Linears (q, k, v, o, gate, up, down), A and B each.
ADAPTER_TENSORS = 4 * 7 * 2


def is_adapter(name: str) -> bool:
    return ".lora_A." in name or ".lora_B." in name


def learner_module(algo):
    return algo.learner_group._learner._rl_module()


def runner_logp(algo, columns: dict[str, np.ndarray]) -> np.ndarray:
    """Log-probs of the (local) env runner's inference-only module, the model its engine samples."""
    module = algo.env_runner.module.eval()
    with torch.no_grad():
        out = module._forward_train({k: torch.as_tensor(v) for k, v in columns.items()})
    return out["token_logp"].numpy()


def test_only_adapters_train(ray_cluster, model_path, tmp_path):
    algo = build(tmp_path, model_path, **LORA)
    try:
        learner = algo.learner_group._learner
        lm = learner._lm()
        trainable = [n for n, p in lm.named_parameters() if p.requires_grad]
        optimized = sum(p.numel() for p in learner._params.values())
        before = {k: v.detach().clone() for k, v in lm.state_dict().items()}
        algo.update_learners(train_batch(algo, synthetic_batch(rows=4)))
        after = {k: v.detach().clone() for k, v in lm.state_dict().items()}
    finally:
        algo.stop()
    assert len(trainable) == ADAPTER_TENSORS and all(is_adapter(n) for n in trainable)
    assert optimized == sum(before[n].numel() for n in before if is_adapter(n))
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    # B starts at zero, so the first step moves B (A's gradient is B^T times something: zero).
    assert {k for k in before if ".lora_B." in k} <= changed
    for name in before:
        if not is_adapter(name):
            assert torch.equal(before[name], after[name]), name  # base weights bit-identical


def test_sync_carries_adapters_and_the_runner_merges_them(ray_cluster, model_path, tmp_path):
    algo = build(tmp_path, model_path, lr=1e-2, **LORA)
    columns = synthetic_batch(rows=6, seed=2)
    try:
        base = runner_logp(algo, columns)
        algo.update_learners(train_batch(algo, columns))
        state = algo.learner_group.get_state(components="learner/rl_module", inference_only=True)
        weights = state["learner"]["rl_module"]["default_policy"]
        algo.env_runner_group.sync_weights(from_worker_or_learner_group=algo.learner_group, inference_only=True)
        learner = algo.score_batch(columns)["token_logp"]
        merged = runner_logp(algo, columns)
        # A second merge of the same adapters starts from the kept base, not from the first merge.
        algo.env_runner.module.set_state(weights)
        merged_again = runner_logp(algo, columns)
    finally:
        algo.stop()
    assert len(weights) == ADAPTER_TENSORS and all(k.endswith(LORA_SUFFIXES) for k in weights)
    assert np.abs(learner - base).max() > 1e-2  # the adapters matter
    np.testing.assert_allclose(merged, learner, rtol=0, atol=1e-5)
    np.testing.assert_array_equal(merged_again, merged)


def test_kl_reference_is_the_base_model_without_a_copy(ray_cluster, model_path, tmp_path, tiny_model):
    algo = build(tmp_path, model_path, kl_coef=0.01, lr=1e-2, **LORA)
    columns = synthetic_batch(rows=5, seed=4)
    try:
        learner = algo.learner_group._learner
        train = train_batch(algo, columns)
        train["ref_logp"] = algo.score_batch(columns)["ref_logp"].astype(np.float32)
        algo.update_learners(train)
        scores = algo.score_batch(columns)
        assert learner._reference is None
        params = {n: p.numel() for n, p in learner._rl_module().named_parameters()}
    finally:
        algo.stop()
    _, base_model = tiny_model
    ids, mask, resp = (torch.as_tensor(columns[k]) for k in ("input_ids", "attention_mask", "resp_mask"))
    with torch.no_grad():
        base, _ = response_scores(base_model.eval(), ids, mask, resp)
    np.testing.assert_allclose(scores["ref_logp"], base.numpy(), rtol=0, atol=1e-6)
    assert np.abs(scores["token_logp"] - scores["ref_logp"]).max() > 1e-2  # the policy moved, the reference did not
    # One model in the learner: its base weights plus the adapters, no second copy.
    assert sum(params.values()) == sum(p.numel() for p in base_model.parameters()) + sum(
        n for name, n in params.items() if is_adapter(name)
    )


def test_one_lora_iteration_with_kl_runs_and_logs(ray_cluster, model_path, tmp_path):
    algo = build(tmp_path, model_path, loss="grpo", kl_coef=0.01, **LORA)
    try:
        kl_parts = k3_by_hand(algo.learner_group._learner)
        result = algo.train()
    finally:
        algo.stop()
    assert result["env_runners"]["num_episodes"] == LEARNER["tasks_per_batch"] * LEARNER["group_size"]
    stats = result["learners"]["default_policy"]
    assert stats["optimizer_steps"] == 1 and stats["skipped_update"] == 0
    # B starts at zero: in the only step the adapted policy is the base model, which is the
    # reference (adapters off), so the k3 KL from the log-probs the loss was given is 0, and so
    # is the logged one. A reference that were not the base model would be ~1e-2 off.
    by_hand = sum(k for k, _ in kl_parts) / sum(n for _, n in kl_parts)
    assert by_hand == pytest.approx(0.0, abs=1e-9)
    assert stats["kl"] == pytest.approx(by_hand, abs=1e-6)
    assert np.isfinite(result["weight_sync_s"])
    assert result["sampler_learner_logp_gap_mean"] < 1e-3  # the runner samples the learner's policy


def test_checkpoint_round_trip_restores_the_adapters(ray_cluster, model_path, tmp_path, monkeypatch):
    exp = validate({**LEARNER, "run_dir": str(tmp_path), "loss": "grpo", "iterations": 1, "lr": 1e-2, **LORA})
    saved = []
    save = training.save_checkpoint

    def recording_save(algo, *args, **kwargs):
        saved.append({k: v.clone() for k, v in learner_module(algo).get_state().items()})
        return save(algo, *args, **kwargs)

    monkeypatch.setattr(training, "save_checkpoint", recording_save)
    summary = training.train(exp, model_path)
    # Adapters and their Adam state only: the full model's weights alone are 16 MB.
    files = [f for f in Path(summary["checkpoint"]).rglob("*") if f.is_file()]
    assert sum(f.stat().st_size for f in files) < 4 * 2**20
    columns = synthetic_batch(rows=4, seed=6)
    fresh = training.build_algorithm(exp, model_path)
    try:
        initial = {k: v.clone() for k, v in learner_module(fresh).get_state().items()}
        fresh.restore_from_path(f"{summary['checkpoint']}/algorithm")
        restored = learner_module(fresh).get_state()
        learner = fresh.score_batch(columns)["token_logp"]
        runner = runner_logp(fresh, columns)
    finally:
        fresh.stop()
    trained = saved[-1]
    assert set(restored) == set(trained) and len(trained) == ADAPTER_TENSORS
    for name, value in trained.items():
        assert torch.equal(restored[name], value), name
    assert any(not torch.equal(initial[k], trained[k]) for k in trained)  # training moved them
    np.testing.assert_allclose(runner, learner, rtol=0, atol=1e-5)  # restore synced the runner


@pytest.mark.parametrize(
    ("lora", "named"),
    [
        ({"rank": 8}, "'lora.rank'"),
        ({"target_module": ["q_proj"]}, "did you mean 'lora.target_modules'"),
        ({"r": 0}, "'lora.r'"),
        ({"dropout": 1.0}, "'lora.dropout'"),
    ],
)
def test_bad_lora_settings_name_the_key(lora, named):
    with pytest.raises(ConfigError, match=named):
        validate({"lora": lora})


def test_lora_defaults():
    assert validate({}).lora is None
    lora = validate({"lora": {"r": 8}}).lora
    assert lora.alpha == 16.0 and lora.dropout == 0.0 and "down_proj" in lora.target_modules
