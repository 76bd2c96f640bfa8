"""EMPGTorchLearner: token-level clipped surrogate over per-turn rows, gradient accumulation.

The driver hands the learner a ready batch (one row per LLM turn, left-padded token ids, a
response mask, per-token advantages already modulated by EMPG over the whole batch), because
group statistics and EMPG's batch min/max/mean must never be computed per learner shard.
"""

from __future__ import annotations

import copy
import math
from typing import Any

import numpy as np
import torch
from ray.rllib.core import DEFAULT_MODULE_ID
from ray.rllib.core.learner.torch.torch_learner import TorchLearner

from empg_rllib.losses import policy_loss
from empg_rllib.scoring import position_ids, scores_of_tokens

#: Batch columns, all [rows, tokens] and aligned with input_ids[:, 1:] (position p predicts
#: token p + 1), except `allowed_ids` ([rows, R, K], constrained decoding: the allowed token ids
#: of the last R positions, -1 padded), present only when some turn was constrained.
COLUMNS = ("input_ids", "attention_mask", "resp_mask", "old_logp", "token_adv", "ref_logp", "allowed_ids")


class EMPGTorchLearner(TorchLearner):
    """Reads `config.experiment` for the loss settings and `micro_batch_size`."""

    def build(self) -> None:
        super().build()
        exp = self.config.experiment
        self._reference = None
        if exp.kl_coef > 0:
            # A frozen copy of the initial policy; the KL term keeps the policy near it.
            self._reference = copy.deepcopy(self.module[DEFAULT_MODULE_ID].unwrapped().lm).eval()
            for p in self._reference.parameters():
                p.requires_grad_(False)
        self.skipped_updates_lifetime = 0
        self._loss_normalizer: float | None = None

    def configure_optimizers_for_module(self, module_id: str, config: Any = None) -> None:
        params = [p for p in self.module[module_id].parameters() if p.requires_grad]
        self.register_optimizer(
            module_id=module_id,
            optimizer=torch.optim.AdamW(params, lr=config.lr, weight_decay=0.0),
            params=params,
            lr_or_lr_schedule=config.lr,
        )

    # ---- the pre-update pass: entropies and log-probs of the generating policy ----------------
    @torch.no_grad()
    def score(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Per-token log-probs, entropies (and reference log-probs) of the current weights."""
        module = self.module[DEFAULT_MODULE_ID].unwrapped()
        n = self.config.experiment.micro_batch_size
        out: dict[str, list[np.ndarray]] = {"token_logp": [], "token_entropy": [], "ref_logp": []}
        for start in range(0, len(batch["input_ids"]), n):
            sub = {k: torch.as_tensor(v[start : start + n], device=self._device) for k, v in batch.items()}
            fwd = module._forward_train(sub)
            out["token_logp"].append(fwd["token_logp"].float().cpu().numpy())
            out["token_entropy"].append(fwd["token_entropy"].float().cpu().numpy())
            if self._reference is not None:
                ids, mask = sub["input_ids"], sub["attention_mask"]
                logits = self._reference(input_ids=ids, attention_mask=mask, position_ids=position_ids(mask)).logits[:, :-1]
                logp, _ = scores_of_tokens(logits, ids[:, 1:], module.temperature, sub.get("allowed_ids"))
                out["ref_logp"].append(logp.cpu().numpy())
        return {k: np.concatenate(v) for k, v in out.items() if v}

    # ---- loss and update -----------------------------------------------------------------
    def compute_loss_for_module(self, *, module_id: str, config: Any, batch: dict[str, Any], fwd_out: dict[str, Any]):
        exp = config.experiment
        loss, stats = policy_loss(
            fwd_out["token_logp"],
            batch["old_logp"],
            batch["token_adv"],
            batch["resp_mask"],
            clip_low=exp.clip_low,
            clip_high=exp.clip_high,
            aggregation=exp.aggregation,
            ref_logp=batch.get("ref_logp") if exp.kl_coef > 0 else None,
            kl_coef=exp.kl_coef,
            normalizer=self._loss_normalizer,
        )
        for name, value in stats.items():
            self.metrics.log_value((module_id, name), value.item(), window=1)
        return loss

    def _update(self, batch: dict[str, Any], **kwargs: Any):
        """One optimizer step per RLlib minibatch, accumulating gradients over micro-batches.

        A non-finite loss skips the whole step (counted) instead of corrupting the weights.
        """
        module_batch = batch[DEFAULT_MODULE_ID]
        exp = self.config.experiment
        mask = module_batch["resp_mask"]
        rows = mask.shape[0]
        if exp.aggregation == "token_mean":
            self._loss_normalizer = float(mask.sum().clamp(min=1))
        else:
            self._loss_normalizer = float((mask.sum(-1) > 0).sum().clamp(min=1))
        for optim in self._optimizer_parameters:
            optim.zero_grad(set_to_none=True)
        total = torch.zeros(())
        fwd_out: dict[str, Any] = {}
        finite = True
        for start in range(0, rows, exp.micro_batch_size):
            sub = {DEFAULT_MODULE_ID: {k: v[start : start + exp.micro_batch_size] for k, v in module_batch.items()}}
            fwd_out = self.module.forward_train(sub)
            losses = self.compute_losses(fwd_out=fwd_out, batch=sub)
            loss = losses[DEFAULT_MODULE_ID]
            if not torch.isfinite(loss):
                finite = False
                break
            loss.backward()
            total = total + loss.detach()
        grads = {pid: p.grad for pid, p in self._params.items() if p.grad is not None}
        if finite and all(torch.isfinite(g).all() for g in grads.values()):
            self.apply_gradients(self.postprocess_gradients(grads))
            self.metrics.log_value((DEFAULT_MODULE_ID, "skipped_update"), 0, reduce="sum")
        else:
            for optim in self._optimizer_parameters:
                optim.zero_grad(set_to_none=True)
            self.skipped_updates_lifetime += 1
            self.metrics.log_value((DEFAULT_MODULE_ID, "skipped_update"), 1, reduce="sum")
            total = torch.tensor(math.nan)
        self.metrics.log_value(
            (DEFAULT_MODULE_ID, "skipped_updates_lifetime"), self.skipped_updates_lifetime, window=1
        )
        return fwd_out, {DEFAULT_MODULE_ID: total}, {}

    # RLlib converts optimizer state to numpy, which fails on bf16: keep CPU tensors.
    def _get_optimizer_state(self) -> dict[str, Any]:
        def to_cpu(value: Any) -> Any:
            return value.detach().cpu() if torch.is_tensor(value) else value

        return {
            name: {
                "module_id": self._optimizer_name_to_module[name],
                "state": {
                    **optim.state_dict(),
                    "state": {
                        i: {k: to_cpu(v) for k, v in s.items()} for i, s in optim.state_dict()["state"].items()
                    },
                },
            }
            for name, optim in self._named_optimizers.items()
        }

    def _set_optimizer_state(self, state: dict[str, Any]) -> None:
        for name, entry in state.items():
            if name in self._named_optimizers:
                self._named_optimizers[name].load_state_dict(entry["state"])
