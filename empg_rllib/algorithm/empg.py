"""EMPGConfig and EMPG: an RLlib Algorithm for GRPO/DAPO with optional EMPG.

One iteration: sample whole groups (same task, `group_size` rollouts) across env runners ->
group advantages from outcomes -> learner pre-update pass for the generating policy's token
entropies -> `empg_modulate` over ALL steps of the batch -> learner update -> weight sync.
GRPO and DAPO are this algorithm with `empg.enabled: false`.

With `async.enabled` the runners keep sampling while the learner updates (async_sampling.py):
the batch is the next `tasks_per_batch` groups in draw order whose policy lag is within
`max_policy_lag`, the loss is decoupled PPO with a truncated importance weight, and new weights
are posted for the runners to load between turns instead of a blocking sync.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import ray
from ray.rllib.algorithms.algorithm import Algorithm
from ray.rllib.algorithms.algorithm_config import AlgorithmConfig
from ray.rllib.core.rl_module.rl_module import RLModuleSpec
from ray.rllib.utils.metrics import ENV_RUNNER_RESULTS, LEARNER_RESULTS

from empg_rllib.algorithm.diagnostics import log_batch_diagnostics
from empg_rllib.algorithm.learner import EMPGTorchLearner
from empg_rllib.algorithm.rl_module import LLMRLModule
from empg_rllib.algorithm.weight_sync import publish_weights, sync_to_runners
from empg_rllib.config.schema import EVAL_SEED, Experiment
from empg_rllib.core import metrics
from empg_rllib.core.advantages import step_entropy
from empg_rllib.core.batch import (
    TurnBatch,
    build_turn_batch,
    drop_uninformative_groups,
    episode_advantages,
    token_advantages,
)
from empg_rllib.core.losses import truncated_importance_weight
from empg_rllib.core.records import EnvFailure, Episode, EpisodeRequest, whole_groups
from empg_rllib.core.update_plan import plan_update, split_rows
from empg_rllib.sampling.async_sampling import AsyncSampler
from empg_rllib.sampling.env_runner import LLMEnvRunner, token_spaces
from empg_rllib.sampling.progress import SamplingHook, SamplingProgress
from empg_rllib.sampling.runner_calls import HealthyRunners, errors_as_values, raise_runner_errors

logger = logging.getLogger(__name__)

#: The largest difference between the sampler's and the learner's log-prob or entropy of a
#: token at which `reuse_sampler_scores` takes the sampler's (fp32 agrees to ~1e-5).
REUSE_TOLERANCE = 1e-4


class EMPGConfig(AlgorithmConfig):
    """RLlib config of EMPG; `experiment(...)` sets everything an experiment file can say."""

    def __init__(self, algo_class: type | None = None) -> None:
        super().__init__(algo_class=algo_class or EMPG)
        self.experiment_settings = Experiment()
        self.model_path: str | None = None
        self.env_runner_cls = LLMEnvRunner
        # LLM rollouts take far longer than RLlib's 60 s default; wait for them.
        self.sample_timeout_s = None
        # No connector state to merge between runners.
        self._dont_auto_sync_env_runner_states = True
        self.restart_failed_env_runners = True
        self.delay_between_env_runner_restarts_s = 1.0
        self.num_aggregator_actors_per_learner = 0

    @property
    def experiment(self) -> Experiment:
        return self.experiment_settings

    def experiment_from(self, exp: Experiment, model_path: str) -> EMPGConfig:
        """Apply an experiment (validated YAML) and the resolved model directory."""
        # Absolute: remote runners write into the run directory (vllm.log) from their own cwd.
        self.experiment_settings = exp.model_copy(update={"run_dir": str(exp.directory.parent)})
        self.model_path = str(model_path)
        self.debugging(seed=exp.seed)
        self.training(lr=exp.lr, grad_clip=exp.grad_clip, grad_clip_by="global_norm", num_epochs=exp.num_epochs)
        runner, learner = exp.resources.env_runner, exp.resources.learner
        self.env_runners(
            num_env_runners=exp.num_env_runners,
            create_local_env_runner=exp.num_env_runners == 0,
            num_cpus_per_env_runner=runner.cpus,
            num_gpus_per_env_runner=runner.gpus,
            custom_resources_per_env_runner=dict(runner.custom),
            # Asynchronous sampling keeps a second call queued on each runner.
            max_requests_in_flight_per_env_runner=2 if exp.async_.enabled else 1,
        )
        self.learners(
            num_learners=exp.num_learners,
            num_cpus_per_learner=learner.cpus,
            num_gpus_per_learner=learner.gpus,
            custom_resources_per_learner=dict(learner.custom),
        )
        return self

    def model_json(self) -> dict[str, Any]:
        """The model directory's config.json (vocabulary size, context length, special ids)."""
        return json.loads((Path(self.model_path) / "config.json").read_text())

    def token_spaces(self):
        config = self.model_json()
        return token_spaces(
            config["vocab_size"], config.get("max_position_embeddings", 4096), self.experiment.max_new_tokens
        )

    def get_default_rl_module_spec(self) -> RLModuleSpec:
        return RLModuleSpec(
            module_class=LLMRLModule,
            model_config={
                "path": self.model_path,
                "dtype": self.experiment.dtype,
                "temperature": self.experiment.temperature,
                "chunk_tokens": self.experiment.logits_chunk_tokens,
                "gradient_checkpointing": self.experiment.gradient_checkpointing,
                "lora": self.experiment.lora.model_dump() if self.experiment.lora else None,
            },
        )

    def get_default_learner_class(self) -> type:
        if self.experiment.learner_backend == "deepspeed":
            from empg_rllib.algorithm.deepspeed_learner import EMPGDeepSpeedLearner

            return EMPGDeepSpeedLearner
        return EMPGTorchLearner

    def validate(self) -> None:
        super().validate()
        if not self.model_path:
            raise ValueError("EMPGConfig needs a model: call experiment_from(exp, model_path)")


class EMPG(Algorithm):
    """Synchronous EMPG / GRPO / DAPO over text environments."""

    @classmethod
    def get_default_config(cls) -> EMPGConfig:
        return EMPGConfig()

    def setup(self, config: Any) -> None:
        super().setup(config)
        exp = self.config.experiment
        self._task_rng = np.random.default_rng(exp.seed)
        model = self.config.model_json()
        pad = model.get("pad_token_id")
        self._pad_id = int(pad if pad is not None else model.get("eos_token_id", 0))
        # A live display's hook (the CLI sets one); the algorithm itself never prints.
        self.on_sampling: SamplingHook = lambda progress: None
        self._policy_version = 0  # the learner's weights version (updates so far)
        self._async_groups_drawn = 0
        share = -(-exp.tasks_per_batch // max(exp.num_env_runners, 1))
        self._async = AsyncSampler(exp.async_.groups_per_call or share) if exp.async_.enabled else None
        self._last_batch_at = time.perf_counter()

    # ---- sampling --------------------------------------------------------------------------
    def _draw_groups(self) -> list[EpisodeRequest]:
        exp = self.config.experiment
        requests = []
        for task in range(exp.tasks_per_batch):
            seed = int(self._task_rng.integers(0, 2**31))
            group = f"{self.iteration}-{task}"
            requests.extend(EpisodeRequest(seed=seed, group=group) for _ in range(exp.group_size))
        return requests

    def _draw_async_group(self) -> tuple[str, list[EpisodeRequest]]:
        seed = int(self._task_rng.integers(0, 2**31))
        group = f"a{self._async_groups_drawn}"
        self._async_groups_drawn += 1
        return group, [EpisodeRequest(seed=seed, group=group) for _ in range(self.config.experiment.group_size)]

    def _sample_async(self) -> list[Episode]:
        """The next batch of groups from the runners sampling in the background (see
        async_sampling.py); logs policy lag, drops, and learner and runner idle fractions."""
        exp = self.config.experiment
        started = time.perf_counter()
        progress = SamplingProgress(
            label=f"iteration {self.iteration + 1}/{exp.iterations} (async)",
            episodes=exp.tasks_per_batch * exp.group_size,
            runners=self.env_runner_group.num_remote_env_runners(),
        )
        found = self._async.next_batch(
            self.env_runner_group,
            self._draw_async_group,
            exp.tasks_per_batch,
            self._policy_version,
            exp.async_.max_policy_lag,
            lambda: self.restore_env_runners(self.env_runner_group),
            on_filed=lambda front: self.on_sampling(replace(progress.finished_with(front), done=False)),
            restore_timeout_s=self.config.env_runner_restore_timeout_s,
        )
        self.on_sampling(progress.finished_with(found.episodes))
        waited = time.perf_counter() - started
        since_last = max(time.perf_counter() - self._last_batch_at, 1e-9)
        self._last_batch_at = time.perf_counter()
        m = self.metrics
        if self._async.metrics:
            m.aggregate(self._async.metrics, key=ENV_RUNNER_RESULTS)
            self._async.metrics.clear()
        runners = max(self.env_runner_group.num_healthy_remote_workers(), 1)
        m.log_value("runner_idle_fraction", max(0.0, 1 - self._async.runner_busy_s / (runners * since_last)), window=1)
        self._async.runner_busy_s = 0.0
        # The learner waits for groups while the driver is here; it works for the rest.
        m.log_value("learner_idle_fraction", waited / since_last, window=1)
        m.log_value("policy_lag_mean", float(np.mean(found.lags)), window=1)
        m.log_value("policy_lag_max", max(found.lags), window=1)
        self._count_dropped("num_stale_groups_dropped", found.dropped_stale)
        self._count_dropped("num_crashed_groups_dropped", found.dropped_incomplete)
        if found.dropped_stale:
            logger.warning("iteration %d: dropped %d groups older than max_policy_lag=%d",
                           self.iteration + 1, found.dropped_stale, exp.async_.max_policy_lag)
        return found.episodes

    def _count_dropped(self, key: str, groups: int) -> None:
        """`env_runners/<key>` for this iteration and `<key>_lifetime` for the run."""
        self.metrics.log_value((ENV_RUNNER_RESULTS, key), groups, reduce="sum")
        self.metrics.log_value((ENV_RUNNER_RESULTS, f"{key}_lifetime"), groups, reduce="lifetime_sum")

    def sample_episodes(
        self,
        requests: list[EpisodeRequest],
        split: str = "train",
        temperature: float | None = None,
        evaluation: bool = False,
    ) -> list[Episode]:
        """Play `requests` on the env runners; a group never splits across runners. Requests of
        a runner that dies are played again after RLlib restarts it. Evaluation episodes stay
        out of `env_runners/` (training metrics, lifetime env steps). An environment that raises
        anything but `EnvCrashed` (crashes are retried inside the runner) raises `EnvFailure`
        here, naming the environment and the cause: a replay would fail the same way. So does
        any other error a runner raises (its engine's, say: `RunnerError`), except a dead vLLM
        engine process, which is a runner restart."""
        group = self.env_runner_group
        exp = self.config.experiment
        progress = SamplingProgress(
            label=f"evaluating {split}" if evaluation else f"iteration {self.iteration + 1}/{exp.iterations}",
            episodes=len(requests),
            evaluation=evaluation,
            runners=group.num_remote_env_runners(),
        )
        self.on_sampling(progress)
        if group.num_remote_env_runners() == 0:
            episodes = self.env_runner.sample(
                requests=requests,
                split=split,
                temperature=temperature,
                evaluation=evaluation,
                on_turn=lambda stats: self.on_sampling(progress.counting(stats)),
            )
            if not evaluation:
                self.metrics.aggregate([self.env_runner.get_metrics()], key=ENV_RUNNER_RESULTS)
            self.on_sampling(progress.finished_with(episodes))
            return episodes
        episodes: list[Episode] = []
        todo = list(requests)
        healthy = HealthyRunners(group, lambda: self.restore_env_runners(group), self.config.env_runner_restore_timeout_s)
        while todo:
            ids = healthy.ids()
            if not ids:
                continue
            groups = list(dict.fromkeys(str(r.group) for r in todo))
            owner = {g: ids[i % len(ids)] for i, g in enumerate(groups)}
            assign = {w: [r for r in todo if owner[str(r.group)] == w] for w in ids}

            def play(runner: Any, assign: dict = assign) -> tuple[list[Episode], dict[str, Any] | None]:
                played = runner.sample(
                    requests=assign.get(runner.worker_index, []), split=split, temperature=temperature,
                    evaluation=evaluation,
                )
                return played, None if evaluation else runner.get_metrics()

            answers = group.foreach_env_runner(errors_as_values(play), local_env_runner=False, timeout_seconds=None)
            raise_runner_errors(answers)
            for answer in answers:
                played, runner_metrics = answer.value
                episodes.extend(played)
                if not evaluation:
                    self.metrics.aggregate([runner_metrics], key=ENV_RUNNER_RESULTS)
            done_workers = {answer.worker for answer in answers}
            todo = [r for r in todo if owner[str(r.group)] not in done_workers]
            if todo:
                logger.warning("%d episodes lost with a failed env runner; playing them again", len(todo))
        self.metrics.log_value(
            (ENV_RUNNER_RESULTS, "num_env_runner_restarts"), group.num_remote_worker_restarts(), window=1
        )
        self.on_sampling(progress.finished_with(episodes))
        return episodes

    # ---- one iteration -----------------------------------------------------------------------
    def training_step(self) -> None:
        """One iteration on whole groups only.

        A group with a member missing (an episode whose environment crashed on every one of
        `env_crash_retries` retries) is dropped whole and counted in
        `env_runners/num_crashed_groups_dropped`; the other groups train. When no group is
        left (every group lost a member, or DAPO found none informative), the update is skipped
        with a warning and counted in `skipped_iterations`, and the next iteration draws new
        tasks: sampling replacement groups instead would hide a broken environment behind ever
        longer iterations. An iteration in which not one episode ended (an unreachable server)
        stops the run with `EnvFailure`.
        """
        self._spent = dict.fromkeys(metrics.TIME_PARTS.values(), 0.0)
        try:
            self._training_step()
        finally:
            for tag, seconds in self._spent.items():
                self.metrics.log_value(tag, seconds, window=1)

    @contextlib.contextmanager
    def _timed(self, tag: str):
        """Adds the block's wall time to this iteration's part `tag` (metrics.TIME_PARTS)."""
        started = time.perf_counter()
        try:
            yield
        finally:
            self._spent[tag] += time.perf_counter() - started

    def _training_step(self) -> None:
        exp = self.config.experiment
        if self._async is not None:
            with self._timed(metrics.SAMPLING_S):
                episodes = self._sample_async()
        else:
            requests = self._draw_groups()
            with self._timed(metrics.SAMPLING_S):
                played = self.sample_episodes(requests)
            if not played:
                # Not one episode ended: the environment is unreachable or broken, not flaky.
                # Going on would run every iteration to the same nothing.
                raise EnvFailure(
                    f"iteration {self.iteration + 1}: every one of the {len(requests)} episodes of env "
                    f"{exp.env!r} crashed on all {exp.env_crash_retries + 1} attempts (env_config "
                    f"{exp.env_config}); the env runners' warnings above name each crash's cause"
                )
            episodes, crashed_groups = whole_groups(requests, played)
            self._count_dropped("num_crashed_groups_dropped", len(crashed_groups))
            if crashed_groups:
                logger.warning(
                    "iteration %d: dropped %d of %d groups whose environment crashed on every retry",
                    self.iteration + 1, len(crashed_groups), exp.tasks_per_batch,
                )
        if exp.loss == "dapo":
            episodes, dropped = drop_uninformative_groups(episodes)
            self.metrics.log_value(metrics.DROPPED_GROUPS, dropped, window=1)
        if not episodes:
            logger.warning("iteration %d: no whole group to train on; skipping the update", self.iteration + 1)
            self.metrics.log_value("skipped_iterations", 1, reduce="sum")
            self._evaluate_if_due()
            return
        advantage = episode_advantages(episodes, scale_by_std=exp.advantage == "grpo")
        with self._timed(metrics.LEARNER_SCORE_S):
            batch, scores, entropy = self.score_steps(episodes)
        empg = exp.empg.modulation() if exp.empg.enabled else None
        step_adv, token_adv, terms = token_advantages(batch, advantage, entropy, empg)
        won = np.array([e.won for e in episodes], dtype=bool)[batch.traj_index]
        log_batch_diagnostics(self.metrics, batch, scores, entropy, advantage[batch.traj_index], won, step_adv, terms)

        train = {
            "input_ids": batch.input_ids,
            "attention_mask": batch.attention_mask,
            "resp_mask": batch.resp_mask,
            "old_logp": scores["token_logp"].astype(np.float32),
            "token_adv": token_adv,
        }
        if batch.allowed_ids is not None:
            train["allowed_ids"] = batch.allowed_ids
        if "ref_logp" in scores:
            train["ref_logp"] = scores["ref_logp"].astype(np.float32)
        if self._async is not None:
            train["is_weight"] = self._importance_weights(scores["token_logp"], batch)
        with self._timed(metrics.LEARNER_UPDATE_S):
            self.metrics.aggregate(self.update_learners(train), key=LEARNER_RESULTS)
        with self._timed(metrics.WEIGHT_SYNC_S):
            if self._async is not None:
                self.post_runner_weights()
            else:
                self.sync_runner_weights()
        self._evaluate_if_due()

    def _importance_weights(self, proximal_logp: np.ndarray, batch) -> np.ndarray:
        """Decoupled PPO's behaviour weight per token, min(pi_prox / pi_behav, cap); logs its
        statistics over the sampled tokens."""
        cap = self.config.experiment.async_.is_weight_cap
        weight = truncated_importance_weight(proximal_logp, batch.sampler_logp, batch.resp_mask, cap)
        mask = batch.resp_mask > 0
        raw = np.exp(np.where(mask, proximal_logp - batch.sampler_logp, 0.0))[mask]
        if raw.size:
            self.metrics.log_value("is_weight_mean", float(weight[mask].mean()), window=1)
            self.metrics.log_value("is_weight_max_untruncated", float(raw.max()), window=1)
            self.metrics.log_value("is_weight_truncated_fraction", float((raw > cap).mean()), window=1)
        return weight

    def _evaluate_if_due(self) -> None:
        """Every `evaluation.interval` iterations, whether or not this one updated the policy:
        a sweep ranks its trials by these results (a weak policy's DAPO skips many updates)."""
        exp = self.config.experiment
        if exp.evaluation.interval and (self.iteration + 1) % exp.evaluation.interval == 0:
            with self._timed(metrics.EVALUATION_S):
                results = self.evaluate_splits()
            for split, result in results.items():
                for key, value in result.items():
                    self.metrics.log_value((metrics.EVALUATION, split, key), value, window=1)

    # ---- the learner group: sharded scoring, planned updates ---------------------------------
    def _num_learners(self) -> int:
        return max(len(self.learner_group), 1)

    def _on_every_learner(self, func: Any, data: dict[str, np.ndarray]) -> list[Any]:
        """`func(learner, data)` on every learner at once, results in rank order; `data` goes
        through the object store once when the learners are remote actors."""
        ref = data if self.learner_group.is_local else ray.put(data)

        def call(learner: Any, ref: Any = ref) -> tuple[int, Any]:
            return learner.rank, func(learner, ray.get(ref) if isinstance(ref, ray.ObjectRef) else ref)

        results = self.learner_group.foreach_learner(call)
        return [value for _, value in sorted((r.get() for r in results.result_or_errors), key=lambda x: x[0])]

    def score_steps(self, episodes: list[Episode]) -> tuple[TurnBatch, dict[str, np.ndarray], np.ndarray]:
        """The turn batch of `episodes` (one row per step), the learner's pre-update scores of
        it, and each step's entropy H_t as EMPG takes it (`empg.step_entropy`)."""
        batch = build_turn_batch(episodes, self._pad_id)
        columns = {"input_ids": batch.input_ids, "attention_mask": batch.attention_mask, "resp_mask": batch.resp_mask}
        if batch.allowed_ids is not None:
            columns["allowed_ids"] = batch.allowed_ids
        scores = self._reused_sampler_scores(episodes, batch, columns) or self.score_batch(columns)
        choices = batch.choice_mask() if self.config.experiment.empg.step_entropy == "choice_tokens" else None
        return batch, scores, step_entropy(scores["token_entropy"], batch.resp_mask, choices)

    def _reused_sampler_scores(
        self, episodes: list[Episode], batch: TurnBatch, columns: dict[str, np.ndarray]
    ) -> dict[str, np.ndarray] | None:
        """The sampler's own log-probs and entropies as the pre-update scores (`reuse_sampler_scores`),
        when every turn was sampled by the learner's current weights and the learner's pass over
        `reuse_check_rows` random rows agrees with them to `REUSE_TOLERANCE`; None (score the
        whole batch) otherwise. The check's gap is logged as the sampler-learner gap."""
        exp = self.config.experiment
        if not exp.reuse_sampler_scores:
            return None
        stale = sum(t.weights_version != self._policy_version for e in episodes for t in e.turns)
        why = "the engine gave no entropies" if batch.sampler_entropy is None else (
            f"{stale} turns were sampled by other weights than the learner's" if stale else "")
        if not why:
            # A stream of its own: the update plan's shuffle draws from the seed and iteration too.
            rng = np.random.default_rng([exp.seed, self.iteration, 1])
            rows = np.sort(rng.choice(len(batch), min(exp.reuse_check_rows, len(batch)), replace=False))
            checked = self.score_batch({k: v[rows] for k, v in columns.items()})
            sampled = {"token_logp": batch.sampler_logp, "token_entropy": batch.sampler_entropy}
            mask = batch.resp_mask[rows] > 0
            gaps = {k: np.abs(sampled[k][rows] - checked[k])[mask] for k in sampled}
            gap = max(float(g.max(initial=0.0)) for g in gaps.values())
            self.metrics.log_value(metrics.SAMPLER_SCORE_GAP, gap, window=1)
            if mask.any():
                logp_gap = gaps["token_logp"]
                self.metrics.log_value(metrics.SAMPLER_LEARNER_LOGP_GAP_MEAN, float(logp_gap.mean()), window=1)
                self.metrics.log_value(metrics.SAMPLER_LEARNER_LOGP_GAP_MAX, float(logp_gap.max()), window=1)
            why = ("the checked rows have no response token" if not mask.any() else
                   f"they differ from the learner's by {gap:.2g} (over {REUSE_TOLERANCE:g}) on {len(rows)} checked rows"
                   if gap > REUSE_TOLERANCE else "")
        self.metrics.log_value(metrics.SAMPLER_SCORES_REUSED, int(not why), window=1)
        if why:
            logger.warning("iteration %d: not reusing the sampler's scores (%s); scoring the whole batch",
                           self.iteration + 1, why)
            return None
        return sampled

    def score_batch(self, columns: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The pre-update pass, each learner scoring its own contiguous share of the rows."""
        shares = split_rows(len(columns["input_ids"]), self._num_learners())
        parts = self._on_every_learner(lambda learner, data: learner.score(data, shares[learner.rank]), columns)
        return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}

    def update_learners(self, train: dict[str, np.ndarray]) -> list[dict[str, Any]]:
        """One update of the whole batch: every learner follows the same plan (update_plan.py)."""
        exp = self.config.experiment
        plan = plan_update(
            train["resp_mask"],
            num_learners=self._num_learners(),
            num_epochs=exp.num_epochs,
            minibatch_size=exp.minibatch_size,
            shuffle=exp.minibatch_size is not None,
            token_mean=exp.aggregation == "token_mean",
            seed=exp.seed * 100_003 + self.iteration,
        )
        return self._on_every_learner(lambda learner, data: learner.update_from_plan(data, plan.shard(learner.rank)), train)

    def _publish_weights(self, to_object_store: bool) -> tuple[int, Any]:
        version, weights = publish_weights(self.learner_group, to_object_store)
        self._policy_version = version
        return version, weights

    def post_runner_weights(self) -> None:
        """Asynchronous sampling: post the new weights for the runners, which load them before
        their next engine batch; nothing waits for them."""
        self._async.post_weights(*self._publish_weights(to_object_store=True))

    def sync_runner_weights(self) -> None:
        """Learner weights -> every env runner's engine, returning once every engine serves them
        (weight_sync.sync_to_runners)."""
        group = self.env_runner_group
        version, weights = self._publish_weights(to_object_store=group.num_remote_env_runners() > 0)
        if group.num_remote_env_runners() == 0:
            self.env_runner.load_weights(weights, version)
            return
        sync_to_runners(group, weights, version, self.config.experiment.weight_sync_timeout_s)

    # ---- evaluation ------------------------------------------------------------------------
    def evaluate_splits(
        self, splits: list[str] | None = None, episodes: int | None = None, seed: int = EVAL_SEED
    ) -> dict[str, dict[str, float]]:
        """Success rate, mean score and length of the current policy on each split, and the
        seconds each split took."""
        exp = self.config.experiment
        results = {}
        for split in splits or exp.evaluation.splits:
            started = time.perf_counter()
            requests = [EpisodeRequest(seed=seed + i, group=f"eval-{i}") for i in range(episodes or exp.evaluation.episodes)]
            played = self.sample_episodes(requests, split=split, temperature=exp.evaluation.temperature, evaluation=True)
            results[split] = {
                metrics.WALL_S: time.perf_counter() - started,
                metrics.SUCCESS_RATE: float(np.mean([e.won for e in played])) if played else 0.0,
                metrics.SCORE_MEAN: float(np.mean([e.score for e in played])) if played else 0.0,
                metrics.EPISODE_LEN_MEAN: float(np.mean([len(e.turns) for e in played])) if played else 0.0,
                metrics.EPISODES: float(len(played)),
            }
        return results

    def cleanup(self) -> None:
        super().cleanup()
        # Outside Tune, Trainable makes an empty log dir under ~/ray_results; metrics go to the
        # run directory's TensorBoard instead, so do not leave it behind.
        with contextlib.suppress(OSError):
            os.rmdir(self.logdir)
            os.rmdir(os.path.dirname(self.logdir))

    # ---- state: add the task RNG so that a resumed run draws the same tasks ------------------
    def get_state(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        state = super().get_state(*args, **kwargs)
        state["task_rng"] = self._task_rng.bit_generator.state
        state["policy_version"] = self._policy_version
        if self._async is not None:
            # The training frontier: groups drawn and not trained yet (buffered, or still being
            # played) are sampled again first after a resume, so none is lost or repeated.
            state["async_groups_drawn"] = self._async_groups_drawn
            state["async_untrained"] = [
                (group, [(r.seed, r.task) for r in requests]) for group, requests in self._async.queue.untrained()
            ]
        return state

    def set_state(self, state: dict[str, Any]) -> None:
        super().set_state(state)
        if "task_rng" in state:
            self._task_rng.bit_generator.state = state["task_rng"]
        self._policy_version = state.get("policy_version", self._policy_version)
        if self._async is not None and "async_untrained" in state:
            self._async_groups_drawn = state["async_groups_drawn"]
            self._async.requeue([
                (group, [EpisodeRequest(seed=seed, task=task, group=group) for seed, task in requests])
                for group, requests in state["async_untrained"]
            ])
