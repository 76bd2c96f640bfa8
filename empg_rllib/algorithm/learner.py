"""EMPGTorchLearner: token-level clipped surrogate over per-turn rows, gradient accumulation.

The driver hands the learner a ready batch (one row per LLM turn, left-padded token ids, a
response mask, per-token advantages already modulated by EMPG over the whole batch), because
group statistics and EMPG's batch min/max/mean must never be computed per learner shard. It
also hands every learner the same `UpdatePlan` (update_plan.py): which rows each learner trains
in each optimizer step and the loss normaliser of the whole minibatch. So with several learners
every row is trained once per epoch, every rank takes the same number of steps, a step is
skipped on all ranks or none, and the reported loss is the minibatch's, not a shard's.

The backend-specific parts (how gradients are synchronised, stepped and gathered) are the
methods under "backend hooks"; the DeepSpeed learner overrides those.
"""

from __future__ import annotations

import contextlib
import copy
import math
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from ray.rllib.core import DEFAULT_MODULE_ID
from ray.rllib.core.learner.torch.torch_learner import TorchLearner
from ray.rllib.policy.sample_batch import MultiAgentBatch, SampleBatch

from empg_rllib.core import metrics
from empg_rllib.core.losses import policy_loss
from empg_rllib.core.precision import resolve_dtype
from empg_rllib.core.scoring import response_scores
from empg_rllib.core.update_plan import loss_normalizer, micro_batches

#: Batch columns, all [rows, tokens] and aligned with input_ids[:, 1:] (position p predicts
#: token p + 1), except `allowed_ids` ([rows, R, K], constrained decoding: the allowed token ids
#: of the last R positions, -1 padded), present only when some turn was constrained.
COLUMNS = ("input_ids", "attention_mask", "resp_mask", "old_logp", "token_adv", "ref_logp", "allowed_ids", "is_weight")

#: Per-step sums every rank contributes to; the minibatch's statistics are ratios of them.
_STAT_SUMS = ("policy_loss", "clipped", "ratio", "kl", "tokens")


def micro_batch(batch: Mapping[str, Any], rows: Any, width: int | None) -> dict[str, Any]:
    """`rows` of `batch` (numpy arrays or tensors), trimmed to the last `width` token columns
    (None: all). `allowed_ids` is right-aligned and scored by its last positions: kept whole."""
    columns = batch["input_ids"].shape[1]
    out = {}
    for key, value in batch.items():
        value = value[rows]
        if width is not None and key != "allowed_ids":  # token columns: width, or width - 1 (next-token)
            full = columns if key in ("input_ids", "attention_mask") else columns - 1
            if value.ndim != 2 or value.shape[1] != full:
                raise ValueError(f"batch column {key!r} has shape {tuple(value.shape)}; expected [rows, {full}]")
            keep = width if full == columns else width - 1
            value = value[:, full - keep :]
        out[key] = value
    return out


def cast_floats(tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """`tensor` in `dtype` if it is floating-point; integer buffers stay as they are."""
    return tensor.to(dtype) if tensor.is_floating_point() else tensor


def frozen_copy(module: torch.nn.Module) -> torch.nn.Module:
    """A copy of `module` in eval mode with no parameter requiring gradients."""
    copied = copy.deepcopy(module).eval()
    for p in copied.parameters():
        p.requires_grad_(False)
    return copied


def own_storages(state: Mapping[str, Any]) -> dict[str, Any]:
    """`state` with every tensor that views part of a larger buffer replaced by a copy
    (DeepSpeed's ZeRO-1/2 keep every parameter as a view into one flat buffer; pickled for Ray, a
    view writes its whole buffer: SmolLM2's 272 tensors became 147 GB). Tensors viewing the same
    elements (a head tied to the embeddings) share one copy."""
    copies: dict[tuple[int, int, tuple[int, ...]], torch.Tensor] = {}
    out = {}
    for name, value in state.items():
        if isinstance(value, torch.Tensor) and value.untyped_storage().nbytes() > value.numel() * value.element_size():
            key = (value.untyped_storage().data_ptr(), value.storage_offset(), tuple(value.shape))
            value = copies.setdefault(key, value.detach().clone())
        out[name] = value
    return out


class EMPGTorchLearner(TorchLearner):
    """Reads `config.experiment` for the loss settings and `micro_batch_size`."""

    def build(self) -> None:
        super().build()
        self._reference = self._build_reference()
        self.skipped_updates_lifetime = 0

    def _needs_reference_copy(self) -> bool:
        """The KL term keeps the policy near a frozen copy of the initial policy. Under LoRA the
        initial policy is the base model, which never trains: the reference is the same model
        with its adapters off (`_reference_lm`), not a second copy."""
        exp = self.config.experiment
        return exp.kl_coef > 0 and exp.lora is None

    def _build_reference(self) -> torch.nn.Module | None:
        return frozen_copy(self._lm()) if self._needs_reference_copy() else None

    def configure_optimizers_for_module(self, module_id: str, config: Any = None) -> None:
        params = [p for p in self.module[module_id].parameters() if p.requires_grad]
        self.register_optimizer(
            module_id=module_id,
            optimizer=torch.optim.AdamW(params, lr=config.lr, weight_decay=0.0),
            params=params,
            lr_or_lr_schedule=config.lr,
        )

    # ---- the group ----------------------------------------------------------------------------
    @property
    def rank(self) -> int:
        return dist.get_rank() if dist.is_initialized() else 0

    @property
    def world_size(self) -> int:
        return dist.get_world_size() if dist.is_initialized() else 1

    def _all_reduce_sum(self, values: torch.Tensor) -> torch.Tensor:
        if self.world_size > 1:
            dist.all_reduce(values, op=dist.ReduceOp.SUM)
        return values

    def _rl_module(self):
        return self.module[DEFAULT_MODULE_ID].unwrapped()

    def _lm(self) -> torch.nn.Module:
        return self._rl_module().lm

    @contextlib.contextmanager
    def _reference_lm(self) -> Iterator[torch.nn.Module]:
        """The KL reference: the frozen copy, or under LoRA the LM with its adapters disabled."""
        if self._reference is not None:
            yield self._reference
            return
        with self._lm().disable_adapter():
            yield self._lm()

    # ---- the pre-update pass: entropies and log-probs of the generating policy ----------------
    @torch.no_grad()
    def score(self, batch: dict[str, np.ndarray], rows: Sequence[int] | None = None) -> dict[str, Any]:
        """Per-token log-probs, entropies (and reference log-probs) of the current weights for
        `rows` of `batch` (all rows when None), in eval mode."""
        module = self._rl_module()
        module.eval()
        exp = self.config.experiment
        index = np.arange(len(batch["input_ids"])) if rows is None else np.asarray(rows)
        names = ("token_logp", "token_entropy", "ref_logp") if exp.kl_coef > 0 else ("token_logp", "token_entropy")
        out = {k: np.zeros((len(index), batch["resp_mask"].shape[1]), dtype=np.float32) for k in names}
        lengths = batch["attention_mask"][index].sum(-1)
        for part, width in micro_batches(lengths, exp.micro_batch_size, exp.length_bucketing):
            sub = {k: torch.as_tensor(v, device=self._device) for k, v in micro_batch(batch, index[part], width).items()}
            columns = sub["resp_mask"].shape[1]
            fwd = module._forward_train(sub)
            scores = {"token_logp": fwd["token_logp"], "token_entropy": fwd["token_entropy"]}
            if exp.kl_coef > 0:
                with self._reference_lm() as reference:
                    scores["ref_logp"], _ = response_scores(
                        reference, sub["input_ids"], sub["attention_mask"], sub["resp_mask"],
                        module.temperature, sub.get("allowed_ids"), chunk_tokens=module.chunk_tokens,
                    )
            for name, value in scores.items():
                out[name][part, out[name].shape[1] - columns :] = value.float().cpu().numpy()
        return out

    # ---- the update ------------------------------------------------------------------------
    def update_from_plan(self, batch: dict[str, np.ndarray], steps: Sequence[tuple[np.ndarray, float]]) -> dict[str, Any]:
        """Train on this learner's shard of each planned step; one optimizer step per entry.

        `batch` is the whole batch (the same on every learner); `steps` is this learner's
        `UpdatePlan.shard(rank)`. Returns the reduced metrics, like RLlib's `Learner.update`.
        """
        self.before_gradient_based_update(timesteps={})
        self._weights_seq_no += 1
        for rows, normalizer in steps:
            # A learner with no rows in a step still runs one (zero-weighted) row so that it
            # joins the step's gradient all-reduce.
            take = rows if len(rows) else np.arange(1)
            sub = MultiAgentBatch({DEFAULT_MODULE_ID: SampleBatch({k: v[take] for k, v in batch.items()})}, len(rows))
            tensors = self._convert_batch_type(sub)
            self._train_step(tensors.policy_batches[DEFAULT_MODULE_ID], normalizer, weight=1.0 if len(rows) else 0.0)
            if len(rows):
                self._log_steps_trained_metrics(tensors)
        self.after_gradient_based_update(timesteps={})
        return self.metrics.reduce()

    def _update(self, batch: dict[str, Any], **kwargs: Any):
        """RLlib's own `Learner.update` path (one learner, one minibatch): a step whose loss is
        normalised over this minibatch."""
        loss = self._train_step(batch[DEFAULT_MODULE_ID], normalizer=None)
        return {}, {DEFAULT_MODULE_ID: torch.tensor(loss)}, {}

    def compute_loss_for_module(self, *, module_id: str, config: Any, batch: dict[str, Any], fwd_out: dict[str, Any]):
        return self._loss(batch, fwd_out, normalizer=None)[0]

    def _train_step(self, module_batch: dict[str, torch.Tensor], normalizer: float | None, weight: float = 1.0) -> float:
        """One optimizer step: gradients accumulated over micro-batches of this shard, the loss
        normalised over the whole minibatch, the step taken or skipped on every rank alike.
        Returns the minibatch's loss (NaN when skipped). `normalizer` None: this shard is the
        whole minibatch."""
        exp = self.config.experiment
        rows = len(module_batch["resp_mask"])
        if normalizer is None:
            normalizer = loss_normalizer(module_batch["resp_mask"], np.arange(rows), exp.aggregation == "token_mean")
        # The step's sums (_STAT_SUMS, then the count of non-finite losses and gradients) stay
        # on the device until the one all-reduce of the step.
        sums = torch.zeros(len(_STAT_SUMS) + 1, dtype=torch.float64, device=self._device)
        # Backends average gradients over ranks; each rank's loss is its share of the
        # minibatch's sum, so scale it back up to the sum.
        scale = weight * self.world_size
        self._zero_grad()
        lengths = module_batch["attention_mask"].sum(-1).cpu().numpy()
        parts = micro_batches(lengths, exp.micro_batch_size, exp.length_bucketing)
        for i, (part, width) in enumerate(parts):
            sub = micro_batch(module_batch, torch.as_tensor(part, device=self._device), width)
            with self._accumulating(last=i == len(parts) - 1):
                fwd = self._forward(sub)
                loss, stats = self._loss(sub, fwd, normalizer)
                finite = bool(torch.isfinite(loss))
                if not finite:
                    # Every rank must still join the gradient all-reduce: back-propagate a
                    # zero that touches the graph instead of the non-finite loss.
                    sums[-1] += 1
                    loss = fwd["token_logp"].sum() * 0.0
                self._backward(loss * scale)
            if finite and weight:
                sums[:-1] += torch.stack([stats.get(k, loss.new_zeros(())) for k in _STAT_SUMS]).to(sums)
        if not self._gradients_finite():
            sums[-1] += 1
        *values, non_finite = self._all_reduce_sum(sums).tolist()
        totals = dict(zip(_STAT_SUMS, values))
        skipped = non_finite > 0
        if skipped:
            self._zero_grad()
            self.skipped_updates_lifetime += 1
        else:
            self._optimizer_step()
        self._log_step(totals, skipped)
        return math.nan if skipped else totals["policy_loss"]

    def _loss(self, batch: dict[str, torch.Tensor], fwd: dict[str, torch.Tensor], normalizer: float | None):
        exp = self.config.experiment
        return policy_loss(
            fwd["token_logp"],
            batch["old_logp"],
            batch["token_adv"],
            batch["resp_mask"],
            normalizer=normalizer,
            clip_low=exp.clip_low,
            clip_high=exp.clip_high,
            aggregation=exp.aggregation,
            ref_logp=batch.get("ref_logp") if exp.kl_coef > 0 else None,
            kl_coef=exp.kl_coef,
            behaviour_weight=batch.get("is_weight"),
        )

    def _log_step(self, totals: dict[str, float], skipped: bool) -> None:
        m, mid = self.metrics, DEFAULT_MODULE_ID
        m.log_value((mid, "skipped_update"), int(skipped), reduce="sum")
        m.log_value((mid, "skipped_updates_lifetime"), self.skipped_updates_lifetime, window=1)
        m.log_value((mid, metrics.OPTIMIZER_STEPS), 0 if skipped else 1, reduce="sum")
        if skipped:
            return
        tokens = max(totals["tokens"], 1.0)
        # The minibatch's own values (all ranks summed), averaged over this update's steps.
        m.log_value((mid, metrics.POLICY_LOSS), totals["policy_loss"], reduce="mean")
        m.log_value((mid, "clip_fraction"), totals["clipped"] / tokens, reduce="mean")
        m.log_value((mid, "ratio_mean"), totals["ratio"] / tokens, reduce="mean")
        if self.config.experiment.kl_coef > 0:
            m.log_value((mid, metrics.KL), totals["kl"] / tokens, reduce="mean")

    # ---- backend hooks: plain torch, DDP when there are several learners -----------------------
    def _forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        # Through the (possibly DDP-wrapped) module, so that DDP sees the forward pass.
        return self.module.forward_train({DEFAULT_MODULE_ID: batch})[DEFAULT_MODULE_ID]

    @contextlib.contextmanager
    def _accumulating(self, last: bool) -> Iterator[None]:
        """Micro-batches before the last accumulate locally; the last one all-reduces."""
        module = self.module[DEFAULT_MODULE_ID]
        with contextlib.nullcontext() if last or not hasattr(module, "no_sync") else module.no_sync():
            yield

    def _backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def _zero_grad(self) -> None:
        for optim in self._optimizer_parameters:
            optim.zero_grad(set_to_none=True)

    def _gradients_finite(self) -> bool:
        grads = [p.grad for p in self._params.values() if p.grad is not None]
        # One device sync for all parameters, not one each.
        return not grads or bool(torch.stack([torch.isfinite(g).all() for g in grads]).all())

    def _optimizer_step(self) -> None:
        grads = {pid: p.grad for pid, p in self._params.items() if p.grad is not None}
        self.apply_gradients(self.postprocess_gradients(grads))

    # ---- state held outside RLlib's learner-0 checkpoint (sharded backends) ------------------------
    def gather_weights(self) -> None:
        """Make the full weights readable by `get_state`; every learner calls it at once. The
        torch backend replicates the weights on every rank: nothing to gather."""

    def full_state_dict(self, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
        """The module's full weights (after `gather_weights`), on the host; given `dtype`, the
        floating-point ones cast to it on the learner's device first, so that the host never
        holds the fp32 copy."""
        if dtype is None:
            return own_storages(self._rl_module().get_state())
        return own_storages({k: cast_floats(v.detach(), dtype).cpu() for k, v in self._rl_module().state_dict().items()})

    def publish_weights(self, to_object_store: bool) -> tuple[int, Any] | None:
        """Rank 0: (weights version, full weights), the weights put into Ray's object store
        from here when `to_object_store`: the env runners then read them from this node, never
        through the driver's memory. Other ranks: None. Call after `gather_weights`."""
        if self.rank != 0:
            return None
        weights = self.full_state_dict(self.published_dtype())
        if to_object_store:
            import ray

            weights = ray.put(weights)
        return self._weights_seq_no, weights

    def published_dtype(self) -> torch.dtype | None:
        """The precision the runners get the weights in (None: as the module holds them): the
        one this learner computes in. With
        bf16 compute the fp32 master weights go out as bf16, half the bytes of every sync (a 7B
        model: 14 GB instead of 28); a runner that keeps fp32 weights (`vllm.dtype: float32`,
        or a CPU without native bf16) samples from the bf16-rounded ones. LoRA adapters are
        not cast: the runners merge them into their base weights."""
        module = self._rl_module()
        dtype = resolve_dtype(module.dtype_requested, self._device, "learner")
        return None if module.lora or dtype == torch.float32 else dtype

    def save_backend_state(self, path: str) -> None:
        """Write what RLlib's checkpoint (learner 0's state) does not hold; every learner calls it
        at once. The torch backend's optimizer state is replicated and in that checkpoint."""

    def load_backend_state(self, path: str) -> None:
        """Read back what `save_backend_state` wrote; every learner calls it at once."""

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
