"""The DeepSpeed learner (real DeepSpeed on CPU, gloo): ZeRO 0-3 on one and two learners train like
the torch learner on the same planned batch, the ZeRO-3 weight gather serves the env runners,
and a checkpointed run resumes exactly."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch

from empg_rllib.algorithm.deepspeed_learner import deepspeed_config
from empg_rllib.config.loading import validate
from empg_rllib.config.schema import ConfigError
from empg_rllib.workflows.runs import latest_checkpoint
from empg_rllib.workflows.training import build_algorithm, train
from tests.helpers import SMALL, build, reduced, synthetic_batch, train_batch

# Micro-batches in plan order, so that two ranks add in one learner's order (as in
# test_learner.py::test_two_learners_train_like_one).
SETTINGS = {"micro_batch_size": 2, "minibatch_size": 5, "num_epochs": 2, "length_bucketing": False}


def full_weights(algo) -> list[dict[str, torch.Tensor]]:
    """Each learner's full weights in rank order (ZeRO-3 gathers them on every rank at once)."""
    algo.learner_group.foreach_learner(lambda learner: learner.gather_weights())
    # Copies: a local learner's state holds its live parameters, which the next update changes.
    results = algo.learner_group.foreach_learner(
        lambda learner: (learner.rank, {k: v.clone() for k, v in learner.full_state_dict().items()})
    )
    return [w for _, w in sorted((r.get() for r in results.result_or_errors), key=lambda x: x[0])]


@pytest.fixture(scope="module")
def torch_reference(ray_cluster, model_path, tmp_path_factory):
    """One torch learner's update of a fixed batch: the batch, its metrics and its weights."""
    algo = build(tmp_path_factory.mktemp("torch"), model_path, **SETTINGS)
    try:
        train = train_batch(algo, synthetic_batch(rows=7, seed=3))
        stats = reduced(algo.update_learners(train)[0])
        weights = full_weights(algo)[0]
    finally:
        algo.stop()
    return train, stats, weights


def check_against_torch(algo, reference) -> None:
    train, want, want_weights = reference
    results = [reduced(r) for r in algo.update_learners(train)]
    weights = full_weights(algo)
    for stats in results:
        assert stats["optimizer_steps"] == want["optimizer_steps"] == 4
        assert stats["policy_loss"] == pytest.approx(want["policy_loss"], rel=1e-4, abs=1e-6)
        # DeepSpeed's clipped global norm against RLlib's: the gradients' scale agrees (Adam
        # alone would hide a factor of 2 in the weights).
        assert stats["gradients_default_optimizer_global_norm"] == pytest.approx(
            want["gradients_default_optimizer_global_norm"], rel=1e-4
        )
    for name, value in want_weights.items():
        for rank_weights in weights:
            # Adam amplifies float-order noise where a gradient is near zero (see test_learner).
            torch.testing.assert_close(rank_weights[name].float(), value, rtol=1e-3, atol=5e-5)


@pytest.mark.deepspeed
@pytest.mark.parametrize("stage", [0, 1, 2])
def test_one_deepspeed_learner_trains_like_torch(ray_cluster, model_path, tmp_path, torch_reference, stage):
    algo = build(tmp_path, model_path, learner_backend="deepspeed", deepspeed={"zero_optimization": {"stage": stage}}, **SETTINGS)
    try:
        check_against_torch(algo, torch_reference)
    finally:
        algo.stop()


@pytest.mark.deepspeed
def test_zero3_on_one_learner_is_refused_before_training(ray_cluster, model_path, tmp_path):
    with pytest.raises(Exception, match="stage 3 with one learner"):
        build(tmp_path, model_path, learner_backend="deepspeed", deepspeed={"zero_optimization": {"stage": 3}})


@pytest.mark.deepspeed
@pytest.mark.parametrize(
    "stage", [pytest.param(0, marks=pytest.mark.slow), pytest.param(1, marks=pytest.mark.slow), pytest.param(2, marks=pytest.mark.slow), 3]
)
def test_two_deepspeed_learners_train_like_one_torch_learner(ray_cluster, model_path, tmp_path, torch_reference, stage):
    """Two gloo ranks: sharded optimizer (1, 2) and parameters (3); every rank joins the ZeRO-3
    gather that RLlib's learner-0 read and the env-runner sync depend on."""
    algo = build(
        tmp_path, model_path, learner_backend="deepspeed", deepspeed={"zero_optimization": {"stage": stage}},
        num_learners=2, **SETTINGS,
    )
    try:
        check_against_torch(algo, torch_reference)
        algo.sync_runner_weights()  # learner 0's get_state must serve full weights, not shards
        runner = {k: v.float() for k, v in algo.env_runner.module.get_state().items()}
        for name, value in full_weights(algo)[0].items():
            torch.testing.assert_close(runner[name], value.float(), rtol=0, atol=0)
    finally:
        algo.stop()


@pytest.mark.deepspeed
def test_zero3_kl_reference_is_the_initial_policy_sharded_like_it(ray_cluster, model_path, tmp_path):
    """ZeRO-3 partitions the LM in place; the KL reference is copied before that and sharded in
    its own engine: it scores as the initial policy did and does not move with the update."""
    algo = build(
        tmp_path, model_path, learner_backend="deepspeed", deepspeed={"zero_optimization": {"stage": 3}},
        num_learners=2, kl_coef=0.1, **SETTINGS,
    )
    try:
        columns = synthetic_batch(rows=7, seed=3)
        before = algo.score_batch(columns)
        mask = columns["resp_mask"] > 0
        np.testing.assert_allclose(before["ref_logp"][mask], before["token_logp"][mask], rtol=0, atol=1e-6)
        algo.update_learners(train_batch(algo, columns))
        after = algo.score_batch(columns)
        np.testing.assert_allclose(after["ref_logp"][mask], before["ref_logp"][mask], rtol=0, atol=1e-6)
        assert np.abs(after["token_logp"][mask] - before["token_logp"][mask]).max() > 1e-4
        # Sharded: each rank holds a partition of every reference parameter, not a full copy.
        sharded = algo.learner_group.foreach_learner(lambda learner: all(p.numel() == 0 for p in learner._reference.parameters()))
        assert all(r.get() for r in sharded.result_or_errors)
    finally:
        algo.stop()


@pytest.mark.deepspeed
def test_weights_leaving_a_zero2_learner_do_not_drag_its_flat_buffer(ray_cluster, model_path, tmp_path):
    """ZeRO-1/2 parameters are views into one flat buffer; pickled for Ray, each view wrote the
    whole buffer (SmolLM2 with 2 learners: 147 GB, killed by Ray's OOM guard)."""
    from ray.rllib.core import COMPONENT_RL_MODULE, DEFAULT_MODULE_ID

    algo = build(tmp_path, model_path, learner_backend="deepspeed", deepspeed={"zero_optimization": {"stage": 2}})
    try:
        learner = algo.learner_group._learner
        assert any(p.untyped_storage().nbytes() > p.numel() * p.element_size() for p in learner._lm().parameters())
        for state in (learner.full_state_dict(), learner.get_state()[COMPONENT_RL_MODULE][DEFAULT_MODULE_ID]):
            for name, tensor in state.items():
                assert tensor.untyped_storage().nbytes() == tensor.numel() * tensor.element_size(), name
    finally:
        algo.stop()


@pytest.mark.deepspeed
def test_a_non_finite_loss_skips_the_deepspeed_step(ray_cluster, model_path, tmp_path):
    algo = build(tmp_path, model_path, learner_backend="deepspeed", deepspeed={"zero_optimization": {"stage": 2}}, micro_batch_size=2)
    try:
        train = train_batch(algo, synthetic_batch(rows=6, seed=5))
        train["token_adv"][5, -1] = np.nan
        before = full_weights(algo)[0]
        stats = reduced(algo.update_learners(train)[0])
        after = full_weights(algo)[0]
    finally:
        algo.stop()
    assert stats["skipped_update"] == 1
    assert all(torch.equal(before[k], after[k]) for k in before)


@pytest.mark.deepspeed
@pytest.mark.parametrize(("learners", "stage"), [(0, 2), pytest.param(2, 3, marks=pytest.mark.slow)])
def test_deepspeed_resume_continues_exactly(ray_cluster, model_path, tmp_path, learners, stage):
    """As the torch learner's resume test: train 2 iterations with a checkpoint after each, drop
    the last, resume; the sharded optimizer state must bring back the same weights."""
    exp = validate({
        **SMALL, "env": "deepsearch", "max_turns": 2, "max_new_tokens": 8, "iterations": 2, "checkpoint_every": 1,
        "run_dir": str(tmp_path), "lr": 1e-3,
        "learner_backend": "deepspeed", "deepspeed": {"zero_optimization": {"stage": stage}}, "num_learners": learners,
    })
    from empg_rllib.workflows.runs import restore_checkpoint

    train(exp, model_path)
    run = tmp_path / exp.name
    last = latest_checkpoint(run)
    assert (last / "learner_backend" / "deepspeed").is_dir()
    algo = build_algorithm(exp, model_path)
    try:
        restore_checkpoint(algo, last)
        final = full_weights(algo)[0]
    finally:
        algo.stop()
    shutil.rmtree(last)
    summary = train(exp, model_path, resume=True)
    assert summary["iterations"] == 2 and len(summary["history"]) == 1
    algo = build_algorithm(exp, model_path)
    try:
        restore_checkpoint(algo, latest_checkpoint(run))
        resumed = full_weights(algo)[0]
    finally:
        algo.stop()
    for name, value in final.items():
        torch.testing.assert_close(resumed[name], value, rtol=0, atol=1e-6)


def test_deepspeed_block_is_validated():
    with pytest.raises(ConfigError, match="learner_backend: deepspeed"):
        validate({"deepspeed": {"zero_optimization": {"stage": 2}}})
    with pytest.raises(ConfigError, match=r"'deepspeed.zero_optimization.stage'.*7"):
        validate({"learner_backend": "deepspeed", "deepspeed": {"zero_optimization": {"stage": 7}}})
    with pytest.raises(ConfigError, match=r"'deepspeed.gradient_accumulation_steps'.*minibatch_size"):
        validate({"learner_backend": "deepspeed", "deepspeed": {"gradient_accumulation_steps": 4}})


def test_deepspeed_config_owns_accumulation_and_bf16():
    user = {"zero_optimization": {"stage": 3, "offload_param": {"device": "cpu"}}, "gradient_clipping": 0.5, "bf16": {"enabled": True}}
    config = deepspeed_config(user, micro_batch_size=4, grad_clip=1.0, bf16=False)
    assert config["gradient_accumulation_steps"] == 1 and config["train_micro_batch_size_per_gpu"] == 4
    assert config["gradient_clipping"] == 0.5  # the block's own key wins over grad_clip
    assert config["bf16"] == {"enabled": False}  # no native bf16: fp32 whatever was asked
    assert config["zero_optimization"]["offload_param"] == {"device": "cpu"}
    assert deepspeed_config({}, micro_batch_size=2, grad_clip=None, bf16=True)["bf16"] == {"enabled": True}


def test_zero_buckets_default_to_the_model_size():
    small = deepspeed_config({}, micro_batch_size=2, grad_clip=None, bf16=False, parameters=4_000_000)
    assert small["zero_optimization"]["reduce_bucket_size"] == small["zero_optimization"]["allgather_bucket_size"] == 4_000_000
    large = deepspeed_config({}, micro_batch_size=2, grad_clip=None, bf16=False, parameters=7_000_000_000)
    assert large["zero_optimization"]["reduce_bucket_size"] == 500_000_000  # DeepSpeed's own default
    own = {"zero_optimization": {"stage": 2, "reduce_bucket_size": 123}}
    kept = deepspeed_config(own, micro_batch_size=2, grad_clip=None, bf16=False, parameters=4_000_000)["zero_optimization"]
    assert kept == {"reduce_bucket_size": 123, "allgather_bucket_size": 4_000_000, "stage": 2}


def test_an_offloaded_optimizer_takes_the_learners_own_adamw():
    """The paper's 32B file offloads the optimizer; DeepSpeed refused the learner's AdamW there."""
    offload = {"zero_optimization": {"stage": 3, "offload_optimizer": {"device": "cpu"}}}
    assert deepspeed_config(offload, micro_batch_size=1, grad_clip=None, bf16=False)["zero_force_ds_cpu_optimizer"] is False
    assert "zero_force_ds_cpu_optimizer" not in deepspeed_config({}, micro_batch_size=1, grad_clip=None, bf16=False)
    own = {**offload, "zero_force_ds_cpu_optimizer": True}
    assert deepspeed_config(own, micro_batch_size=1, grad_clip=None, bf16=False)["zero_force_ds_cpu_optimizer"] is True
