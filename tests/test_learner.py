"""The learner group on a fixed batch: planned minibatches, several learners against one, the
collective skip, the reported loss, eval-mode scoring, bf16 with fp32 master weights."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import torch

from empg_rllib.core import precision
from empg_rllib.core.losses import masked_aggregate
from empg_rllib.core.update_plan import micro_batches, plan_update
from tests.helpers import build, reduced, synthetic_batch, train_batch


def learner_weights(algo) -> list[dict[str, torch.Tensor]]:
    """Each learner's LM weights, in rank order."""
    results = algo.learner_group.foreach_learner(
        lambda learner: (learner.rank, {k: v.detach().cpu().clone() for k, v in learner._lm().state_dict().items()})
    )
    return [w for _, w in sorted((r.get() for r in results.result_or_errors), key=lambda x: x[0])]


def real_tokens(ids: list[list[int]], mask: list[list[int]]) -> list[tuple[int, ...]]:
    """Each row's tokens without its padding (a micro-batch may be trimmed to its longest row)."""
    return [tuple(i for i, m in zip(row, row_mask) if m) for row, row_mask in zip(ids, mask)]


# ---- the plan ----------------------------------------------------------------------------------
@pytest.mark.parametrize("learners", [1, 2, 3])
@pytest.mark.parametrize(("rows", "minibatch"), [(100, 64), (7, 3), (5, None), (2, 64)])
def test_plan_trains_every_row_once_per_epoch_with_equal_steps(learners, rows, minibatch):
    mask = (np.random.default_rng(rows).random((rows, 6)) > 0.3).astype(np.float32)
    plan = plan_update(mask, num_learners=learners, num_epochs=3, minibatch_size=minibatch, seed=4)
    per_epoch = len(plan.steps) // 3
    assert per_epoch == -(-rows // (minibatch or rows))
    for epoch in range(3):
        seen = np.concatenate([s.rows for s in plan.steps[epoch * per_epoch : (epoch + 1) * per_epoch]])
        assert sorted(seen.tolist()) == list(range(rows))  # every row exactly once
    for step in plan.steps:
        assert len(step.shards) == learners  # every rank takes every step
        assert len(step.rows) <= (minibatch or rows)
        assert step.normalizer == max(mask[step.rows].sum(), 1)  # token-mean over the minibatch
    # RLlib's cyclic iterator trained 28 of 100 rows twice at minibatch 64.
    assert max(len(s.rows) for s in plan.steps) - min(len(s.rows) for s in plan.steps) <= 1


def test_plan_sequence_normaliser_counts_rows_with_responses():
    mask = np.array([[1, 1], [0, 0], [0, 1]], dtype=np.float32)
    plan = plan_update(mask, num_learners=2, token_mean=False, shuffle=False)
    assert plan.steps[0].normalizer == 2.0


@pytest.mark.parametrize("bucket", [True, False])
def test_micro_batches_take_every_row_once_and_trim_only_padding(bucket):
    lengths = np.random.default_rng(2).integers(3, 40, 23)
    parts = micro_batches(lengths, 4, bucket)
    assert sorted(np.concatenate([rows for rows, _ in parts]).tolist()) == list(range(23))
    assert len(parts) == 6 and all(len(rows) <= 4 for rows, _ in parts)
    for rows, width in parts:
        assert width is None if not bucket else width == lengths[rows].max()
    if bucket:  # rows of similar length together: the computed positions shrink
        assert sum(len(r) * w for r, w in parts) < 0.8 * 23 * lengths.max()


# ---- one learner: the loop that the plan drives -----------------------------------------------
def test_update_trains_each_row_once_per_epoch_and_reports_the_minibatch_loss(ray_cluster, model_path, tmp_path):
    algo = build(tmp_path, model_path, micro_batch_size=2, minibatch_size=4, num_epochs=2)
    learner = algo.learner_group._learner
    seen: list[tuple[int, ...]] = []
    original = learner._loss

    def recording(batch, fwd, normalizer):
        seen.extend(real_tokens(batch["input_ids"].tolist(), batch["attention_mask"].tolist()))
        return original(batch, fwd, normalizer)

    learner._loss = recording
    try:
        columns = synthetic_batch(rows=9)
        train = train_batch(algo, columns)
        results = algo.update_learners(train)
    finally:
        algo.stop()
    rows = Counter(real_tokens(columns["input_ids"].tolist(), columns["attention_mask"].tolist()))
    assert Counter(seen) == Counter({row: 2 * n for row, n in rows.items()})  # 2 epochs, no row twice
    stats = reduced(results[0])
    assert stats["optimizer_steps"] == 6  # 9 rows in minibatches of <= 4: 3 per epoch
    assert stats["skipped_update"] == 0


def test_reported_loss_is_the_minibatch_loss_not_the_last_micro_batch(ray_cluster, model_path, tmp_path):
    algo = build(tmp_path, model_path, micro_batch_size=2, lr=1e-12)
    try:
        columns = synthetic_batch(rows=7)
        train = train_batch(algo, columns)
        stats = reduced(algo.update_learners(train)[0])
    finally:
        algo.stop()
    # One minibatch (the whole batch), ratio 1: the DAPO surrogate is -sum(A) / tokens.
    expected = masked_aggregate(-torch.as_tensor(train["token_adv"]), torch.as_tensor(train["resp_mask"]), "token_mean")
    assert stats["policy_loss"] == pytest.approx(expected.item(), rel=1e-4, abs=1e-6)
    assert stats["ratio_mean"] == pytest.approx(1.0, abs=1e-5)
    assert stats["clip_fraction"] == 0.0


def test_length_bucketed_micro_batches_give_the_loss_and_gradients_of_padded_ones(ray_cluster, model_path, tmp_path):
    """Rows of 4-18 tokens in micro-batches of 2: grouped by length and trimmed (the default),
    or in plan order at the batch's width; fp32, the same scores, loss and gradients to 1e-5."""
    columns = synthetic_batch(rows=9, seed=5)
    lengths = columns["attention_mask"].sum(-1)
    assert lengths.min() < lengths.max() - 6  # padding to trim
    seen = {}
    for bucketing in (True, False):
        algo = build(tmp_path / str(bucketing), model_path, micro_batch_size=2, length_bucketing=bucketing)
        learner = algo.learner_group._learner
        grads, widths = [], []
        original = learner._loss

        def recording(batch, fwd, normalizer, original=original, widths=widths):
            widths.append(batch["input_ids"].shape[1])
            return original(batch, fwd, normalizer)

        def record_gradients(learner=learner, grads=grads):  # instead of the step: the weights stay
            grads.append({n: p.grad.detach().clone() for n, p in learner._lm().named_parameters() if p.grad is not None})

        learner._loss, learner._optimizer_step = recording, record_gradients
        try:
            train = train_batch(algo, columns) if not seen else {**columns, **seen[True]["train"]}
            scores = algo.score_batch(columns)
            stats = reduced(algo.update_learners(train)[0])
        finally:
            algo.stop()
        seen[bucketing] = {"train": {k: train[k] for k in ("old_logp", "token_adv")}, "scores": scores,
                           "loss": stats["policy_loss"], "grads": grads[0], "widths": widths}
    on, off = seen[True], seen[False]
    assert sum(on["widths"]) < sum(off["widths"]) == 5 * columns["input_ids"].shape[1]
    for name in ("token_logp", "token_entropy"):
        np.testing.assert_allclose(on["scores"][name], off["scores"][name], atol=1e-5)
    assert on["loss"] == pytest.approx(off["loss"], abs=1e-5)
    assert on["grads"].keys() == off["grads"].keys()
    for name, grad in on["grads"].items():
        torch.testing.assert_close(grad, off["grads"][name], rtol=0, atol=1e-5)


def test_scoring_runs_in_eval_mode(ray_cluster, model_path, tmp_path):
    algo = build(tmp_path, model_path)
    try:
        learner = algo.learner_group._learner
        for layer in learner._lm().model.layers:
            layer.self_attn.attention_dropout = 0.5  # would make train-mode passes differ
        columns = synthetic_batch(rows=4)
        algo.update_learners(train_batch(algo, columns))  # forward_train leaves train() on
        first, second = algo.score_batch(columns), algo.score_batch(columns)
    finally:
        algo.stop()
    np.testing.assert_array_equal(first["token_logp"], second["token_logp"])
    np.testing.assert_array_equal(first["token_entropy"], second["token_entropy"])


# ---- several learners --------------------------------------------------------------------------
def test_two_learners_train_like_one(ray_cluster, model_path, tmp_path):
    """The same batch, planned the same way: DDP over two gloo ranks must give the weights of one
    learner (each rank's loss is its share of the minibatch's sum, scaled for DDP's average)."""
    # Micro-batches in plan order: grouped by length, one learner's and each rank's shard would be
    # trimmed to other widths, and Adam's first steps turn that float-order noise into a ~lr move
    # of a weight whose gradient is near zero (the grouping's own exactness is tested above).
    settings = {"micro_batch_size": 2, "minibatch_size": 5, "num_epochs": 2, "length_bucketing": False}
    columns = synthetic_batch(rows=7, seed=3)
    one = build(tmp_path / "one", model_path, **settings)
    try:
        train = train_batch(one, columns)
        results_one = one.update_learners(train)
        weights_one = learner_weights(one)[0]
    finally:
        one.stop()
    two = build(tmp_path / "two", model_path, num_learners=2, **settings)
    try:
        scores = two.score_batch(columns)  # sharded: each learner scores its own rows
        np.testing.assert_allclose(scores["token_logp"], train["old_logp"], atol=1e-5)
        results_two = two.update_learners(train)
        weights_two = learner_weights(two)
    finally:
        two.stop()
    one_stats, two_stats = reduced(results_one[0]), [reduced(r) for r in results_two]
    assert [r["optimizer_steps"] for r in two_stats] == [4, 4]  # 7 rows: 2 steps x 2 epochs
    assert one_stats["optimizer_steps"] == 4
    for name, value in weights_one.items():
        torch.testing.assert_close(weights_two[0][name], weights_two[1][name], rtol=0, atol=0)  # replicas agree
        # Adam amplifies float-order noise where a gradient is near zero: a few weights of 860k
        # differ by ~1e-5 after 4 steps at lr 1e-3 (4e-3 of movement); a wiring error moves all.
        torch.testing.assert_close(weights_two[0][name], value, rtol=1e-3, atol=5e-5)
    # Adam does not see the gradient's scale; the clipped global norm does (DDP's average).
    for key in ("policy_loss", "ratio_mean", "clip_fraction", "gradients_default_optimizer_global_norm"):
        assert two_stats[0][key] == pytest.approx(two_stats[1][key])
        assert two_stats[0][key] == pytest.approx(one_stats[key], rel=1e-4, abs=1e-6)


def test_a_non_finite_loss_on_one_rank_skips_the_step_on_every_rank(ray_cluster, model_path, tmp_path):
    two = build(tmp_path, model_path, num_learners=2, micro_batch_size=2)
    try:
        columns = synthetic_batch(rows=6, seed=5)
        train = train_batch(two, columns)
        train["token_adv"][5, -1] = np.nan  # the last row: rank 1's shard only
        before = learner_weights(two)
        results = two.update_learners(train)
        after = learner_weights(two)
    finally:
        two.stop()
    assert [reduced(r)["skipped_update"] for r in results] == [1, 1]
    for rank in (0, 1):
        for name, value in before[rank].items():
            assert torch.equal(after[rank][name], value), (rank, name)


# ---- bf16 --------------------------------------------------------------------------------------
def test_bf16_falls_back_to_fp32_without_native_support(monkeypatch, caplog):
    monkeypatch.setattr(precision, "cpu_bf16_flags", lambda: ())
    monkeypatch.setattr(precision, "_announced", set())
    assert precision.resolve_dtype("bfloat16", "cpu", "learner") == torch.float32
    assert "no native bf16" in caplog.text and "learner" in caplog.text
    monkeypatch.setattr(precision, "cpu_bf16_flags", lambda: ("avx512_bf16",))
    assert precision.resolve_dtype("bfloat16", "cpu") == torch.bfloat16
    assert precision.resolve_dtype("float32", "cpu") == torch.float32
    with pytest.raises(ValueError, match="float16"):
        precision.resolve_dtype("float16")


def test_bf16_learner_keeps_fp32_master_weights_and_moves_them_at_small_lr(
    ray_cluster, model_path, tmp_path, monkeypatch
):
    """bf16 compute, fp32 weights and Adam state: at lr 1e-6 the weights move (bf16 weights would
    round every such update away). bf16 is forced on, whatever this CPU has."""
    monkeypatch.setattr(precision, "cpu_bf16_flags", lambda: ("avx512_bf16",))
    algo = build(tmp_path, model_path, dtype="bfloat16", lr=1e-6, grad_clip=None)
    try:
        learner = algo.learner_group._learner
        before = {k: v.detach().clone() for k, v in learner._lm().named_parameters()}
        algo.update_learners(train_batch(algo, synthetic_batch(rows=4)))
        assert learner._rl_module()._compute_dtype == torch.bfloat16
        params = dict(learner._lm().named_parameters())
        assert all(p.dtype == torch.float32 for p in params.values())
        state = next(iter(learner._named_optimizers.values())).state
        assert all(s["exp_avg"].dtype == torch.float32 for s in state.values())
        moved = {k: (params[k] != before[k]).float().mean().item() for k in before}
        # The runners get the weights in the precision the learner computes in: half the bytes.
        masters = learner.full_state_dict()
        _, published = learner.publish_weights(to_object_store=False)
        assert published.keys() == masters.keys()
        assert all(torch.equal(published[k], v.to(torch.bfloat16)) for k, v in masters.items())
    finally:
        algo.stop()
    # Adam's first step moves every weight with a non-zero gradient by about lr.
    assert moved["model.layers.0.mlp.down_proj.weight"] > 0.9
    assert np.mean(list(moved.values())) > 0.5
