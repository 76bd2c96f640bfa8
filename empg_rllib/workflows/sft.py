"""Behaviour cloning on expert demonstrations: the warm start a from-scratch model needs.

Demonstrations are the environments' experts playing the train split, turned into exactly the
prompts the RL agent will see (same prompt builder, same history window) with the expert's
action in the answer format as the target. Loss: cross-entropy on the response tokens only.
With `constrain_actions` (the agent samples only admissible actions), each response token's
cross-entropy is taken over the tokens constrained decoding would allow there: behaviour
cloning of the policy that will actually act.
"""

from __future__ import annotations

import logging
import math
import os
import random
import re
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

import empg_envs
from empg_rllib.config.prompt import PromptConfig
from empg_rllib.core.choices import ChoiceTrie, allowed_tensor, walk
from empg_rllib.core.precision import autocast, resolve_dtype
from empg_rllib.core.scoring import left_pad, position_ids, response_scores, score_responses, scores_of_tokens
from empg_rllib.sampling.prompting import HistoryTurn, action_choices, build_prompt_ids, format_response
from empg_rllib.util.fileio import atomic_directory

logger = logging.getLogger(__name__)
_VERB = re.compile(r"[A-Za-z_]+")


@dataclass
class Demonstration:
    prompt_ids: list[int]
    response_ids: list[int]
    task_type: str
    allowed: list[list[int]] | None = None  # constrained decoding: allowed ids per response token
    action: str = ""  # the expert's action as the environment received it


def allowed_along(choices: list[list[int]], response: list[int]) -> list[list[int]] | None:
    """The allowed token ids at each token of `response` under constrained decoding over
    `choices`; None if `response` is not one of them."""
    taken, allowed, complete = walk(ChoiceTrie(choices), response)
    return allowed if complete and len(taken) == len(response) else None


def collect_demonstrations(
    tokenizer: Any,
    make_env: Callable[[], Any],
    episodes: int,
    prompt_config: PromptConfig,
    seed: int = 0,
    constrain_actions: bool = False,
) -> tuple[list[Demonstration], float]:
    """Expert episodes -> one (prompt, response) pair per turn; returns them and the expert's
    success rate (episodes the expert did not win are left out)."""
    rng = random.Random(seed)
    env = make_env()
    demos: list[Demonstration] = []
    encoded: dict[str, list[int]] = {}
    wins = 0
    try:
        for _ in range(episodes):
            obs, info = env.reset(seed=rng.randrange(2**31))
            instruction, history, turns = info["instruction"], [], []
            done = False
            while not done:
                action = empg_envs.expert_action(env)
                prompt = build_prompt_ids(
                    tokenizer, instruction, obs, history, info.get("admissible_actions"), prompt_config
                )
                response = tokenizer.encode(format_response(action, think=prompt_config.think), add_special_tokens=False)
                allowed = None
                if constrain_actions and info.get("admissible_actions"):
                    allowed = allowed_along(action_choices(tokenizer, info["admissible_actions"], encoded), response)
                turns.append(Demonstration(prompt, response, info["task_type"], allowed, action))
                history.append(HistoryTurn(obs, action))
                obs, _, terminated, truncated, info = env.step(action)
                done = terminated or truncated
            if info.get("won"):
                wins += 1
                demos.extend(turns)
    finally:
        env.close()
    return demos, wins / max(episodes, 1)


def train_sft(
    model: Any,
    demos: list[Demonstration],
    pad_id: int,
    epochs: int = 2,
    lr: float = 1e-3,
    batch_size: int = 16,
    seed: int = 0,
    log: Callable[[dict[str, float]], None] | None = None,
    bf16_autocast: bool = False,
    prompt_loss_weight: float = 0.0,
) -> list[float]:
    """Cross-entropy on response tokens; returns the mean response loss of each epoch. `log`
    gets every optimiser step's `step` (of `steps`), `epoch` and response `loss`.

    `prompt_loss_weight` > 0 adds language modelling of the prompt tokens (observations,
    admissible actions) with that weight: for a model trained from scratch this is most of the
    signal per forward pass, and predicting list items it has seen earlier in the prompt is
    exactly the copying skill that choosing an admissible action needs.
    `bf16_autocast` runs the forward pass under bf16 autocast where the hardware computes bf16
    natively (about 1.5x faster on CPUs with AVX-512 BF16; elsewhere emulated bf16 is ~60x
    slower, so it falls back to fp32 with a logged line); weights and optimizer state stay fp32.
    """
    if not demos:
        raise ValueError("no demonstrations to train on")
    generator = torch.Generator().manual_seed(seed)
    compute = resolve_dtype("bfloat16" if bf16_autocast else "float32", model.device, "SFT")
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    steps_total = epochs * ((len(demos) + batch_size - 1) // batch_size)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: max(0.05, 1 - s / steps_total))
    model.train()
    epoch_losses = []
    step = 0
    for epoch in range(epochs):
        losses = []
        for batch_ids in _length_bucketed_batches(demos, batch_size, generator):
            chunk = [demos[i] for i in batch_ids]
            ids, mask = left_pad([d.prompt_ids + d.response_ids for d in chunk], pad_id)
            # Weights of the predicted tokens ids[:, 1:]: 1 on the response, prompt_loss_weight
            # on the prompt, 0 on padding.
            response = torch.zeros_like(ids, dtype=torch.float32)
            for row, d in enumerate(chunk):
                response[row, ids.shape[1] - len(d.response_ids) :] = 1.0
            weight = (response + prompt_loss_weight * (1 - response) * mask)[:, 1:]
            allowed = allowed_tensor([d.allowed for d in chunk], max(len(d.response_ids) for d in chunk))
            with autocast(compute, model.device):
                if prompt_loss_weight:
                    logits = model(input_ids=ids, attention_mask=mask, position_ids=position_ids(mask)).logits[:, :-1]
                    token_loss = -scores_of_tokens(logits, ids[:, 1:], 1.0, allowed)[0]
                else:
                    # Only the response is trained: the LM head runs at its positions alone, as
                    # in the learner, not at every prompt position.
                    token_loss = -response_scores(model, ids, mask, weight, 1.0, allowed)[0]
            loss = (token_loss * weight).sum() / weight.sum()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            scheduler.step()
            response_w = response[:, 1:]
            losses.append(float((token_loss.detach() * response_w).sum() / response_w.sum()))
            step += 1
            if log is not None:
                log({"step": step, "steps": steps_total, "epoch": epoch, "loss": losses[-1]})
        epoch_losses.append(sum(losses) / len(losses))
    model.eval()
    return epoch_losses


def action_probabilities(
    model: Any, demos: list[Demonstration], pad_id: int, temperature: float = 1.0, batch_size: int = 16
) -> dict[str, float]:
    """Mean probability the policy gives the expert's whole action, over all turns ("all") and
    per verb (the action's leading word: "take", "search"); over the allowed tokens where the
    demos carry them. The mean SFT loss hides the few decisions that matter (which object to
    take) among many forced or easy tokens; on held-out demonstrations this shows them."""
    by_verb: dict[str, list[float]] = defaultdict(list)
    for start in range(0, len(demos), batch_size):
        chunk = demos[start : start + batch_size]
        logps, _ = score_responses(
            model,
            [d.prompt_ids for d in chunk],
            [d.response_ids for d in chunk],
            pad_id,
            temperature,
            [d.allowed for d in chunk],
        )
        for demo, logp in zip(chunk, logps):
            probability = math.exp(sum(logp))
            by_verb["all"].append(probability)
            verb = _VERB.match(demo.action.strip())
            by_verb[verb.group() if verb else "(other)"].append(probability)
    return {verb: sum(ps) / len(ps) for verb, ps in sorted(by_verb.items())}


def _length_bucketed_batches(
    demos: list[Demonstration], batch_size: int, generator: torch.Generator, bucket_batches: int = 8
) -> list[list[int]]:
    """A random order cut into batches of similar length (less padding to compute on): windows
    of `bucket_batches` batches are sorted by length, then the batches are shuffled."""
    order = torch.randperm(len(demos), generator=generator).tolist()
    window = batch_size * bucket_batches
    batches = []
    for start in range(0, len(order), window):
        part = sorted(order[start : start + window], key=lambda i: len(demos[i].prompt_ids) + len(demos[i].response_ids))
        batches += [part[j : j + batch_size] for j in range(0, len(part), batch_size)]
    return [batches[i] for i in torch.randperm(len(batches), generator=generator).tolist()]


def save_model(model: Any, tokenizer: Any, out_dir: str | os.PathLike) -> Path:
    """save_pretrained of model and tokenizer into `out_dir`, written atomically."""
    with atomic_directory(out_dir) as staging:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
    return Path(out_dir)


def run_sft(exp: Any, out_dir: str | os.PathLike, log: Callable[[dict[str, float]], None] | None = None) -> dict[str, Any]:
    """Warm-start `exp.model` on expert demonstrations of `exp.env`; save the result to `out_dir`."""
    from empg_rllib.workflows import models

    started = time.perf_counter()
    tokenizer, model = models.load(exp.model)
    prompt_config = exp.prompt_config
    env_config = {**exp.env_config, "split": exp.sft.split, "max_turns": exp.max_turns}
    demos, expert_success = collect_demonstrations(
        tokenizer,
        lambda: empg_envs.make(exp.env, **env_config),
        exp.sft.episodes,
        prompt_config,
        seed=exp.seed,
        constrain_actions=exp.constrain_actions,
    )
    collected = time.perf_counter()
    if not demos:
        raise ValueError(
            f"SFT: the expert won none of its {exp.sft.episodes} {exp.env} episodes within max_turns={exp.max_turns}, "
            "so there is nothing to imitate; raise max_turns or sft.episodes"
        )
    torch.manual_seed(exp.seed)
    losses = train_sft(
        model,
        demos,
        tokenizer.pad_token_id,
        exp.sft.epochs,
        exp.sft.lr,
        exp.sft.batch_size,
        exp.seed,
        log,
        bf16_autocast=exp.sft.bf16_autocast,
        prompt_loss_weight=exp.sft.prompt_loss_weight,
    )
    path = save_model(model, tokenizer, out_dir)
    trained = time.perf_counter()
    heldout: dict[str, float] = {}
    if exp.sft.heldout_episodes:
        held, _ = collect_demonstrations(
            tokenizer,
            lambda: empg_envs.make(exp.env, **{**env_config, "split": exp.sft.heldout_split}),
            exp.sft.heldout_episodes,
            prompt_config,
            seed=exp.seed + 1,
            constrain_actions=exp.constrain_actions,
        )
        heldout = action_probabilities(model, held, tokenizer.pad_token_id, exp.temperature)
    return {
        "model": str(path),
        "demonstrations": len(demos),
        "expert_success": expert_success,
        "epoch_losses": losses,
        "heldout_action_probability": heldout,
        "collect_s": collected - started,
        "train_s": trained - collected,
        "heldout_s": time.perf_counter() - trained,
    }


def warm_start(
    exp: Any, model_path: str, sft_dir: Path, run: Callable[[Any, Path], Any] = run_sft
) -> str:
    """The model RL starts from: `model_path` itself, or with `warm_start: sft` the SFT model in
    `sft_dir`, trained first by `run(exp, sft_dir)` unless an earlier run left it there (SFT
    writes its directory atomically, so one that exists is complete)."""
    if exp.warm_start != "sft":
        return model_path
    if not (sft_dir / "config.json").exists():
        run(exp, sft_dir)
    return str(sft_dir)


def describe(exp: Any, summary: dict[str, Any]) -> str:
    """One paragraph on what an SFT run (`run_sft`'s summary) did, with the held-out
    probability of the expert's action per verb when it was measured."""
    line = (
        f"SFT: {summary['demonstrations']} demonstration turns (expert success {summary['expert_success']:.0%}), "
        f"epoch losses {[round(x, 3) for x in summary['epoch_losses']]}, "
        f"{summary['collect_s']:.0f}s collecting + {summary['train_s']:.0f}s training -> {summary['model']}"
    )
    if probabilities := summary["heldout_action_probability"]:
        shown = ", ".join(f"{verb} {p:.2f}" for verb, p in probabilities.items())
        line += f"\n   P(expert action) on {exp.sft.heldout_episodes} {exp.sft.heldout_split} expert episodes: {shown}"
    return line
