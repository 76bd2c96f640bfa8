"""The names of the metrics training logs: one place that producers (the env runners, the
algorithm, the learners) and consumers (the CLI's progress lines, sweeps, reports) import.

Producers log a leaf name under RLlib's MetricsLogger (the env runners' under `env_runners/`,
the learners' under `learners/default_policy/`, the algorithm's at the top level); consumers read
the flattened TensorBoard tags, "/"-joined. It sits in `core` because the env runners (in
`sampling`) produce metrics too: every layer above may import it.
"""

from __future__ import annotations

ENV_RUNNERS = "env_runners"  # RLlib's ENV_RUNNER_RESULTS
LEARNERS = "learners/default_policy"  # RLlib's LEARNER_RESULTS / the default module id

# ---- env runners: one value per sampling call ---------------------------------------------------
SUCCESS_RATE = "success_rate"
SUCCESS_RATE_BY_TYPE = "success_rate_by_type"  # a section: one value per task type
EPISODE_LEN_MEAN = "episode_len_mean"
INVALID_ACTION_RATE = "invalid_action_rate"
FORMAT_ERROR_RATE = "format_error_rate"
ENV_STEPS_PER_S = "env_steps_per_s"
GENERATED_TOKENS_PER_S = "generated_tokens_per_s"
#: Prompt tokens per second of engine time (prefill included or spared by a prefix cache) and
#: per turn: with the generated tokens, the model's FLOPs that a turn asks of the engine.
PROMPT_TOKENS_PER_S = "prompt_tokens_per_s"
PROMPT_TOKENS_MEAN = "prompt_tokens_mean"
NUM_ENV_CRASHES = "num_env_crashes"
NUM_ENV_CRASH_RETRIES = "num_env_crash_retries"
NUM_CRASHED_EPISODES = "num_crashed_episodes"
NUM_CRASHED_EPISODES_LIFETIME = "num_crashed_episodes_lifetime"
# RLlib's own names, which the env runners log too.
EPISODE_RETURN_MEAN = "episode_return_mean"
NUM_ENV_STEPS_SAMPLED_LIFETIME = "num_env_steps_sampled_lifetime"

# ---- the algorithm: one value per training step ----------------------------------------------------
STEP_ENTROPY_MEAN = "step_entropy_mean"
STEP_ENTROPY_PERCENTILES = (10, 50, 90)
STEP_ENTROPY_VALUES = "step_entropy_values"  # the batch's H_t; TensorBoard's histogram below
STEP_ENTROPY_HISTOGRAM = "step_entropy"
CONFIDENT_ERROR_SHARE = "confident_error_share"
OUTCOMES = ("success", "failure")
EMPG_TERMS = ("g", "f")
EMPG_STATS = ("mean", "min", "max")
SAMPLER_LEARNER_LOGP_GAP_MEAN = "sampler_learner_logp_gap_mean"
SAMPLER_LEARNER_LOGP_GAP_MAX = "sampler_learner_logp_gap_max"
LEARNER_SCORE_S = "learner_score_s"
#: `reuse_sampler_scores`: the largest sampler-learner difference on the checked rows, and
#: whether the sampler's scores were taken (1) or the whole batch scored (0).
SAMPLER_SCORE_GAP = "sampler_score_gap"
SAMPLER_SCORES_REUSED = "sampler_scores_reused"
WEIGHT_SYNC_S = "weight_sync_s"
SAMPLING_S = "sampling_s"  # waiting for the batch's episodes (async: for the next groups)
LEARNER_UPDATE_S = "learner_update_s"
EVALUATION_S = "evaluation_s"  # `evaluation.interval`'s evaluations inside an iteration
ITERATION_S = "time_this_iter_s"  # RLlib's wall time of one iteration
DROPPED_GROUPS = "dropped_groups"
TIME_TOTAL_S = "time_total_s"  # RLlib's wall time since the run started

# ---- the learners: one value per update ---------------------------------------------------------------
POLICY_LOSS = "policy_loss"
OPTIMIZER_STEPS = "optimizer_steps"
KL = "kl"


def step_entropy_percentile(q: int) -> str:
    return f"step_entropy_p{q}"


def step_entropy_mean_of(outcome: str) -> str:
    """Mean step entropy of the batch's trajectories with `outcome` (one of OUTCOMES)."""
    return f"{STEP_ENTROPY_MEAN}_{outcome}"


def empg_term(name: str, stat: str) -> str:
    """Batch statistic `stat` (one of EMPG_STATS) of EMPG's term `name` (one of EMPG_TERMS)."""
    return f"empg_{name}_{stat}"


def env_runners(name: str) -> str:
    """The TensorBoard tag of an env runners' metric."""
    return f"{ENV_RUNNERS}/{name}"


def learners(name: str) -> str:
    """The TensorBoard tag of a learners' metric."""
    return f"{LEARNERS}/{name}"


EVALUATION = "evaluation"
SCORE_MEAN = "score_mean"
EPISODES = "episodes"
WALL_S = "wall_s"
#: What an evaluation reports per split (besides its number of EPISODES and its WALL_S), and a
#: sweep may rank by.
EVALUATION_KEYS = (SUCCESS_RATE, SCORE_MEAN, EPISODE_LEN_MEAN)


def evaluation(split: str, key: str) -> str:
    """The tag of `key` (success_rate, score_mean, episode_len_mean, ...) of held-out `split`."""
    return f"{EVALUATION}/{split}/{key}"


#: The figures of each iteration that the CLI prints and history.json keeps: label -> tag.
SUMMARY_KEYS = {
    "success": env_runners(SUCCESS_RATE),
    "return": env_runners(EPISODE_RETURN_MEAN),
    "len": env_runners(EPISODE_LEN_MEAN),
    "invalid": env_runners(INVALID_ACTION_RATE),
    "steps/s": env_runners(ENV_STEPS_PER_S),
    "tokens/s": env_runners(GENERATED_TOKENS_PER_S),
    "H_step": STEP_ENTROPY_MEAN,
    "loss": learners(POLICY_LOSS),
}

#: The parts of an iteration's wall time that the algorithm times: label -> tag.
TIME_PARTS = {
    "sampling": SAMPLING_S,
    "scoring": LEARNER_SCORE_S,
    "update": LEARNER_UPDATE_S,
    "weight_sync": WEIGHT_SYNC_S,
    "evaluation": EVALUATION_S,
}


def time_split(scalars: dict[str, float]) -> dict[str, float]:
    """One iteration's wall time (`total`) by part (TIME_PARTS' labels, 0 for a part that did
    not run), and `other`: what none of them covers (building the batch, advantages, metrics)."""
    parts = {label: float(scalars.get(tag, 0.0)) for label, tag in TIME_PARTS.items()}
    total = float(scalars.get(ITERATION_S, sum(parts.values())))
    return {**parts, "other": max(total - sum(parts.values()), 0.0), "total": total}
