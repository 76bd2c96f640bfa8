"""`gradient_checkpointing`: the experiment key reaches the learner's LM, and recomputing the
activations in the backward pass gives the gradients of the plain pass.

No Ray cluster: the module is built straight from the spec `EMPGConfig` gives RLlib. The memory
it saves is measured as benchmarks/gradient_checkpointing.py measures it (peak RSS of one forward
and backward in a fresh process, glibc's mmap threshold fixed so that RSS follows the live
tensors); that test is slow (two fresh interpreters) and Linux + glibc only.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from empg_rllib.algorithm.empg import EMPGConfig
from empg_rllib.algorithm.rl_module import LLMRLModule
from empg_rllib.config.loading import validate
from empg_rllib.core.losses import policy_loss

BENCHMARK = Path(__file__).resolve().parent.parent / "benchmarks" / "gradient_checkpointing.py"


def module(model_path: str, checkpointing: bool, inference_only: bool = False) -> LLMRLModule:
    """The module RLlib builds from an experiment setting `gradient_checkpointing`."""
    exp = validate({"env": "deepsearch", "gradient_checkpointing": checkpointing})
    config = EMPGConfig().experiment_from(exp, model_path)
    spec = config.get_default_rl_module_spec()
    spec.observation_space, spec.action_space = config.token_spaces()
    spec.inference_only = inference_only
    return spec.build()


def rows(vocab: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """Left-padded rows in the learner's layout, responses of 2-9 tokens right-aligned."""
    g = torch.Generator().manual_seed(seed)
    lengths, responses = [40, 33, 25, 38], [9, 2, 5, 7]
    width = max(lengths)
    ids = torch.zeros(len(lengths), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    resp = torch.zeros(len(lengths), width - 1)
    for r, (n, k) in enumerate(zip(lengths, responses)):
        ids[r, width - n :] = torch.randint(5, vocab, (n,), generator=g)
        mask[r, width - n :] = 1
        resp[r, width - 1 - k :] = 1
    return {"input_ids": ids, "attention_mask": mask, "resp_mask": resp}


def loss_gradients(rl_module: LLMRLModule, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Gradients of the learner's policy loss (DAPO's token mean, behaviour log-probs a little
    off the current ones so that some ratios clip), through the learner's path: the module is in
    eval mode after the pre-update pass, and `forward_train` puts it in train mode."""
    rl_module.eval()
    rl_module.zero_grad(set_to_none=True)
    logp = rl_module.forward_train(batch)["token_logp"]
    assert rl_module.lm.training
    g = torch.Generator().manual_seed(1)
    resp = batch["resp_mask"]
    old_logp = (logp.detach() + 0.3 * torch.randn(resp.shape, generator=g)) * resp
    advantages = torch.randn(resp.shape, generator=g) * resp
    loss, _ = policy_loss(logp, old_logp, advantages, resp, clip_low=0.2, clip_high=0.28, aggregation="token_mean")
    loss.backward()
    return {name: p.grad.clone() for name, p in rl_module.named_parameters() if p.grad is not None}


def test_the_key_reaches_the_learners_lm(model_path):
    assert module(model_path, True).lm.is_gradient_checkpointing
    assert not module(model_path, False).lm.is_gradient_checkpointing
    # An env runner's module never trains: no checkpointing there.
    assert not module(model_path, True, inference_only=True).lm.is_gradient_checkpointing


def test_checkpointed_gradients_equal_the_plain_ones(model_path):
    plain, checkpointed = module(model_path, False), module(model_path, True)
    assert plain.lm.config.attention_dropout == 0.0  # train mode would otherwise differ by chance
    batch = rows(plain.lm.config.vocab_size)
    # The decoder layers run twice per step when checkpointed: the recompute happens on the
    # learner's own path (`response_scores` calls the decoder, not the LM's forward).
    # (Counted by wrapping `forward`: forward hooks do not fire during the recompute.)
    calls = {"plain": 0, "checkpointed": 0}
    for name, m in (("plain", plain), ("checkpointed", checkpointed)):
        layer = m.lm.get_decoder().layers[0]

        def counted(*args, name=name, forward=layer.forward, **kwargs):
            calls[name] += 1
            return forward(*args, **kwargs)

        layer.forward = counted
    want = loss_gradients(plain, batch)
    got = loss_gradients(checkpointed, batch)
    assert calls == {"plain": 1, "checkpointed": 2}
    assert got.keys() == want.keys() and len(want) == len(list(plain.parameters()))
    for name, grad in want.items():
        assert grad.abs().sum() > 0 or "embed" in name, name
        torch.testing.assert_close(got[name], grad, rtol=0, atol=1e-5, msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.parametrize("value", ["sometimes", 2, [True]])
def test_a_bad_value_is_refused_naming_the_key(value):
    from empg_rllib.config.schema import ConfigError

    with pytest.raises(ConfigError, match=r"'gradient_checkpointing'.*boolean"):
        validate({"gradient_checkpointing": value})


@pytest.mark.slow  # two fresh interpreters importing torch, transformers and RLlib: about 40 s
@pytest.mark.skipif(
    not Path("/proc/self/clear_refs").exists() or platform.libc_ver()[0] != "glibc",
    reason="measures peak RSS with Linux's VmHWM reset and glibc's mmap threshold",
)
def test_checkpointing_lowers_the_peak_memory_of_a_step(model_path):
    def peak(variant: str) -> dict:
        env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(128 * 1024)}
        proc = subprocess.run(
            [sys.executable, str(BENCHMARK), "--child", model_path, variant, "4", "512"],
            capture_output=True, text=True, env=env, timeout=300,
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
        return json.loads(proc.stdout.strip().splitlines()[-1])

    plain, checkpointed = peak("plain"), peak("checkpointed")
    assert plain["peak_measure"] == checkpointed["peak_measure"] == "VmHWM"
    # Measured on a 2-core AMD EPYC: 185 MB plain, 90 MB checkpointed; held after the forward
    # pass 164 vs 36 MB.
    assert checkpointed["peak_above_start_mb"] < 0.75 * plain["peak_above_start_mb"], (plain, checkpointed)
    assert checkpointed["held_after_forward_mb"] < 0.5 * plain["held_after_forward_mb"], (plain, checkpointed)
