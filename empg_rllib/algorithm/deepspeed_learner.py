"""EMPGDeepSpeedLearner: the same planned update as EMPGTorchLearner, with DeepSpeed ZeRO 0-3.

What changes against the torch (DDP) backend, each verified on CPU with gloo (two ranks):
- `deepspeed.initialize` wraps the AdamW that RLlib registered (so RLlib's lr bookkeeping still
  reaches it) inside the process group Ray already set up; DeepSpeed only needs LOCAL_RANK.
- Gradients accumulate over micro-batches with `gradient_accumulation_steps: 1` and an explicit
  accumulation boundary on the last micro-batch, then one `engine.step()`: without the
  boundary ZeRO-1/2 reduce the wrong gradients.
- DeepSpeed averages gradients over ranks, as DDP does, so the base class's world-size scaling
  of the loss holds. Clipping is DeepSpeed's (`gradient_clipping`).
- bf16 is DeepSpeed's: bf16 weights and compute, fp32 master weights and Adam state in the ZeRO
  optimizer; used only where the hardware has native bf16 (precision.py).
- ZeRO-3 shards the parameters, so the full weights (for the env runners) are gathered by a
  collective that every rank must join: `gather_weights` runs on all learners at once, and
  RLlib's learner-0-only `get_state` then serves the gathered copy instead of deadlocking.
- Checkpoints hold each rank's optimizer shard: `save_backend_state`/`load_backend_state` run
  `engine.save_checkpoint`/`load_checkpoint` on every rank into the checkpoint directory.
"""

from __future__ import annotations

import contextlib
import os
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from ray.rllib.core import COMPONENT_OPTIMIZER, COMPONENT_RL_MODULE, DEFAULT_MODULE_ID

from empg_rllib.algorithm.learner import EMPGTorchLearner, cast_floats, frozen_copy
from empg_rllib.core.precision import resolve_dtype


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


#: DeepSpeed's default communication bucket (elements) for ZeRO's gradient reduce and
#: all-gather: sized for billions of parameters.
DEFAULT_BUCKET = 500_000_000


def deepspeed_config(
    user: dict[str, Any], *, micro_batch_size: int, grad_clip: float | None, bf16: bool, parameters: int = DEFAULT_BUCKET
) -> dict[str, Any]:
    """DeepSpeed's config: the user's `deepspeed:` block over the values the experiment owns.

    The accumulation is ours (micro-batches, one step per planned minibatch), so DeepSpeed sees
    one micro-batch per step; `bf16.enabled` is what the host can run natively. ZeRO's buckets
    default to at most the model's `parameters`: DeepSpeed allocates the full default bucket
    (500M elements, 2 GB in fp32) even for a model a hundred times smaller, which on a 4M-parameter
    model tripled the step time of ZeRO-2 on a CPU (benchmarks/learner.py). A block that sets
    them keeps its own values.
    """
    config = {
        "train_micro_batch_size_per_gpu": micro_batch_size,
        "gradient_clipping": grad_clip or 0.0,
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
        **user,
    }
    config["gradient_accumulation_steps"] = 1
    config.pop("train_batch_size", None)
    config["bf16"] = {**config.get("bf16", {}), "enabled": bf16}
    bucket = min(DEFAULT_BUCKET, parameters)
    config["zero_optimization"] = {
        "reduce_bucket_size": bucket,
        "allgather_bucket_size": bucket,
        **config.get("zero_optimization", {}),
    }
    if config["zero_optimization"].get("offload_optimizer"):
        # The learner hands DeepSpeed its own torch AdamW, which DeepSpeed refuses beside an
        # offloaded optimizer unless told otherwise; its DeepSpeedCPUAdam would need a compiled
        # op on every node. A block that sets the key keeps its own value.
        config.setdefault("zero_force_ds_cpu_optimizer", False)
    return config


class EMPGDeepSpeedLearner(EMPGTorchLearner):
    """`learner_backend: deepspeed`; the `deepspeed:` block is DeepSpeed's own config keys."""

    # ---- build: DeepSpeed instead of DDP ------------------------------------------------------
    def _make_modules_ddp_if_necessary(self) -> None:
        import deepspeed
        import deepspeed.ops

        exp = self.config.experiment
        # The only op DeepSpeed would JIT-compile with a torch optimizer (~100 s) serves its
        # inference all-reduce, which training never uses.
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
        if not dist.is_initialized():
            # A local learner (num_learners: 0) has no process group; DeepSpeed needs one.
            os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
            os.environ.setdefault("MASTER_PORT", str(_free_port()))
            dist.init_process_group("gloo", rank=0, world_size=1)
        os.environ["LOCAL_RANK"] = "0"  # each learner process sees its own device
        os.environ["RANK"] = str(dist.get_rank())
        os.environ["WORLD_SIZE"] = str(dist.get_world_size())
        bf16_requested = exp.dtype == "bfloat16" or bool(exp.deepspeed.get("bf16", {}).get("enabled", False))
        bf16 = bf16_requested and resolve_dtype("bfloat16", self._device, "DeepSpeed learner") == torch.bfloat16
        module = self._rl_module()
        self.ds_config = deepspeed_config(
            exp.deepspeed,
            micro_batch_size=exp.micro_batch_size,
            grad_clip=exp.grad_clip,
            bf16=bf16,
            parameters=sum(p.numel() for p in module.lm.parameters() if p.requires_grad),
        )
        # DeepSpeed's bf16 path is its own; no autocast on top of it.
        module._compute_dtype = torch.float32
        # ZeRO-3 partitions the LM in place: the KL reference is copied from the full weights first.
        self._unpartitioned_reference = frozen_copy(module.lm) if self._needs_reference_copy() else None
        self.engine, *_ = deepspeed.initialize(
            model=module.lm,
            optimizer=self.get_optimizer(DEFAULT_MODULE_ID),
            config=self.ds_config,
            dist_init_required=False,
        )
        self.zero_stage = int(self.engine.zero_optimization_stage())
        # The algorithm's setup reads learner 0's weights once the group is built; every rank
        # is building right now, so the collective can run.
        self.gather_weights()

    def _build_reference(self) -> torch.nn.Module | None:
        reference, self._unpartitioned_reference = self._unpartitioned_reference, None
        if reference is None or self.zero_stage < 3:
            return reference
        import deepspeed

        # Under ZeRO-3 the reference is sharded as the policy is (a full copy per rank is what
        # ZeRO-3 exists to avoid): its own engine without an optimizer, whose hooks gather each
        # layer for the forward. Every rank scores the same number of micro-batches, so the
        # gathers line up.
        config = {key: self.ds_config[key] for key in ("train_micro_batch_size_per_gpu", "bf16", "steps_per_print")}
        zero = {k: v for k, v in self.ds_config["zero_optimization"].items() if k != "offload_optimizer"}
        config["zero_optimization"] = zero
        self._reference_engine, *_ = deepspeed.initialize(model=reference, config=config, dist_init_required=False)
        return self._reference_engine.module.eval()

    # ---- backend hooks -----------------------------------------------------------------------
    @contextlib.contextmanager
    def _accumulating(self, last: bool) -> Iterator[None]:
        self.engine.set_gradient_accumulation_boundary(last)
        yield

    def _backward(self, loss: torch.Tensor) -> None:
        self.engine.backward(loss, scale_wrt_gas=False)

    def _zero_grad(self) -> None:
        self.engine.zero_grad()  # p.grad only
        if self.zero_stage > 0:  # the ZeRO optimizer's partitioned gradient buffers
            self.engine.optimizer.zero_grad(set_to_none=True)

    def _gradients_finite(self) -> bool:
        # ZeRO-1/2/3 keep gradients in partitioned buffers and skip an overflowing step
        # themselves (the norm is all-reduced, so every rank agrees); stage 0 keeps p.grad.
        return super()._gradients_finite() if self.zero_stage == 0 else True

    def _optimizer_step(self) -> None:
        norm = None
        if self.zero_stage == 0:  # DeepSpeed reports no norm at stage 0; p.grad holds the gradients
            grads = [p.grad.float().norm() for p in self._lm().parameters() if p.grad is not None]
            norm = torch.stack(grads).norm() if grads else None
        self.engine.step()
        norm = self.engine.get_global_grad_norm() if norm is None else norm
        if norm is not None:
            self.metrics.log_value(
                (DEFAULT_MODULE_ID, "gradients_default_optimizer_global_norm"), float(norm), window=1
            )

    # ---- full weights: a collective under ZeRO-3 -------------------------------------------------
    def gather_weights(self) -> None:
        """Gather the full weights on every rank (call on all learners at once, before anything
        reads this learner's module state). A no-op below ZeRO-3, where every rank holds them."""
        if self.zero_stage < 3:
            return
        import deepspeed

        lm = self._lm()
        with deepspeed.zero.GatheredParameters(list(lm.parameters()), modifier_rank=None):
            # Copies: the gathered storage is freed again when the context ends. With LoRA the
            # module's state is the adapters alone.
            self._gathered = {k: v.detach().cpu().clone() for k, v in self._rl_module().get_state().items()}

    def full_state_dict(self, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
        if self.zero_stage != 3:
            return super().full_state_dict(dtype)
        return self._gathered if dtype is None else {k: cast_floats(v, dtype) for k, v in self._gathered.items()}

    def get_state(self, components=None, *, not_components=None, **kwargs: Any) -> dict[str, Any]:
        state = super().get_state(components, not_components=not_components, **kwargs)
        if COMPONENT_RL_MODULE in state:
            # ZeRO-3: the gathered weights; below: copies of the views into ZeRO's flat buffer.
            state[COMPONENT_RL_MODULE] = {DEFAULT_MODULE_ID: self.full_state_dict()}
        return state

    def _get_optimizer_state(self) -> dict[str, Any]:
        return {}  # sharded across ranks: save_backend_state writes every rank's part

    def get_checkpointable_components(self) -> list:
        # No module sub-checkpoint for RLlib to restore: it would load full weights into ZeRO-3's
        # empty shards (and bypass ZeRO's fp32 master copy at any stage). The weights come back
        # from DeepSpeed's own checkpoint on every rank (load_backend_state).
        return []

    def set_state(self, state: dict[str, Any]) -> None:
        # Loading weights into the module would bypass ZeRO's fp32 master copy; weights and the
        # optimizer come back through load_backend_state on every rank instead.
        super().set_state({k: v for k, v in state.items() if k not in (COMPONENT_RL_MODULE, COMPONENT_OPTIMIZER)})

    # ---- checkpoints: each rank's optimizer shard ------------------------------------------------
    def save_backend_state(self, path: str) -> None:
        self.engine.save_checkpoint(path, tag="deepspeed")

    def load_backend_state(self, path: str) -> None:
        if not (Path(path) / "deepspeed").is_dir():
            raise FileNotFoundError(f"{path} holds no DeepSpeed state (was the run trained with learner_backend: deepspeed?)")
        self.engine.load_checkpoint(path, tag="deepspeed")
        self.gather_weights()  # the restored weights, for the env-runner sync that follows
        # RLlib's restore already synced the runners (with the weights before this load) under
        # the restored version number; a runner takes only newer versions.
        self._weights_seq_no += 1
