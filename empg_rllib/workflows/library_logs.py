"""Library log lines that say nothing about a run, kept out of the user's terminal."""

from __future__ import annotations

import logging
import os

#: Lines libraries log on every run that say nothing about it: (logger, start of the message).
_LIBRARY_NOISE = (
    # The new API stack is the only one this project has.
    ("ray.rllib.algorithms.algorithm_config", "You are running "),
    # RLlib 2.60's RLModule.__init__ builds the deprecated RLModuleConfig itself (kept for old
    # custom modules), so every RLModule warns, however it is constructed (ray-project/ray#51630);
    # ours are built by RLModuleSpec.build with the keyword arguments the warning asks for.
    ("ray._common.deprecation", "DeprecationWarning: `RLModule(config=[RLModuleConfig object])`"),
    # Tune's system monitor asks for GPUtil; the CPU and RAM metrics it logs need only psutil.
    ("ray.tune.utils.util", "Install gputil"),
    # Saving a transformers model imports DeepSpeed (accelerate unwraps the model), which
    # announces that it found no GPU.
    ("DeepSpeed", "Setting accelerator to CPU"),
)


class _DropMessage(logging.Filter):
    def __init__(self, prefix: str) -> None:
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.prefix)


def quiet_libraries() -> None:
    """Silence the libraries' per-run chatter (transformers' progress bars, the lines in
    `_LIBRARY_NOISE`) and keep tokenizers and the hub offline and single-threaded."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    for name, prefix in _LIBRARY_NOISE:
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropMessage) and f.prefix == prefix for f in logger.filters):
            logger.addFilter(_DropMessage(prefix))
