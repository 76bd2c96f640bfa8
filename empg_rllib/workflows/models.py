"""Offline model factory: a byte-level BPE tokenizer and a small Qwen2-architecture causal LM.

Nothing is downloaded. The tokenizer is trained on text the project's environments and prompts
produce, so the tiny model spends its vocabulary on words it will actually read and write.
The LM head is untied from the embeddings (`tie_word_embeddings=False`): the tiny model's
vocabulary is small, so a head of its own costs little.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from empg_envs.core import cache_dir
from empg_rllib.util.fileio import atomic_directory
from empg_rllib.workflows import pretrained

logger = logging.getLogger(__name__)

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|pad|>"]
EOS_TOKEN, PAD_TOKEN = "<|im_end|>", "<|pad|>"
# ChatML, as Qwen2.5 uses, so prompts built for the tiny model carry over to a real one.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


@dataclass(frozen=True)
class ModelSize:
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    vocab_size: int = 4096
    max_position_embeddings: int = 4096


MODEL_SIZES: dict[str, ModelSize] = {
    "tiny": ModelSize(256, 512, 4, 4, 2),  # ~4M parameters
    "small": ModelSize(512, 1536, 8, 8, 2),  # ~28M parameters
}

#: Part of the cache key of built models: a new corpus makes a new tokenizer.
CORPUS_VERSION = 2
#: Environments whose expert episodes make up the tokenizer corpus.
DEFAULT_CORPUS_ENVS = ("alfworld", "webshop", "deepsearch")
FORMAT_WORDS = (
    "<think>",
    "</think>",
    "<action>",
    "</action>",
    "system",
    "user",
    "assistant",
)


def _expert_episode_text(env_id: str, episodes: int, seed: int) -> Iterator[str]:
    """The text a model reads and writes on `env_id`: the env's lexicon, then the user messages
    and expert responses of expert episodes, rendered as the agent's prompts render them."""
    import empg_envs  # envs is only needed when a corpus is built
    from empg_rllib.config.prompt import PromptConfig
    from empg_rllib.sampling.prompting import HistoryTurn, format_response, user_message

    rng = random.Random(seed)
    prompt_config = PromptConfig(history_turns=1)
    for split in ("train", "eval_seen"):
        env = empg_envs.make(env_id, split=split)
        try:
            # Names no episode may show; twice, as BPE merges only pairs seen at least twice.
            yield from 2 * ["".join(f" {name}" for name in env.unwrapped.lexicon)]
            for _ in range(episodes):
                obs, info = env.reset(seed=rng.randrange(1 << 30))
                history: list[HistoryTurn] = []
                done = False
                while not done:
                    action = empg_envs.expert_action(env)
                    yield user_message(
                        info["instruction"], obs, history, info.get("admissible_actions"), prompt_config, len(history)
                    )
                    yield format_response(action, thought=info["instruction"])
                    history.append(HistoryTurn(obs, action))
                    obs, _, terminated, truncated, info = env.step(action)
                    done = terminated or truncated
        finally:
            env.close()


def corpus(
    env_ids: Iterable[str] = DEFAULT_CORPUS_ENVS, episodes_per_env: int = 12, seed: int = 0
) -> list[str]:
    """Text for tokenizer training: prompts, the answer format and expert episodes of `env_ids`."""
    from empg_rllib.config.prompt import PromptConfig
    from empg_rllib.sampling.prompting import format_instructions

    texts = [
        # Twice, as BPE merges only pairs it has seen at least twice.
        *2 * ["\n".join(FORMAT_WORDS), PromptConfig().system_prompt],
        format_instructions(PromptConfig(think=True)),
        format_instructions(PromptConfig(think=False)),
        " ".join(str(i) for i in range(1000)),
    ]
    for env_id in env_ids:
        texts.extend(t for t in _expert_episode_text(env_id, episodes_per_env, seed) if t)
    return texts


def build_tokenizer(texts: list[str], vocab_size: int = 4096):
    """Byte-level BPE trained on `texts`, with a ChatML template; a PreTrainedTokenizerFast."""
    from tokenizers import (
        Regex,
        Tokenizer,
        decoders,
        models,
        normalizers,
        pre_tokenizers,
        processors,
        trainers,
    )
    from transformers import PreTrainedTokenizerFast
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

    tokenizer = Tokenizer(models.BPE())
    # AutoTokenizer loads any qwen2-type model directory as a Qwen2Tokenizer, which splits text
    # with Qwen2's own normaliser and regex; train with the same, or the merges learned here
    # would be applied to different pieces at load time.
    tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        bos_token=None,
        unk_token=None,
        chat_template=CHAT_TEMPLATE,
        model_max_length=MODEL_SIZES["tiny"].max_position_embeddings,
    )


def build_model(size: str, tokenizer, seed: int = 0):
    """A randomly initialised Qwen2ForCausalLM of `size`, seeded."""
    import torch
    from transformers import GenerationConfig, Qwen2Config, Qwen2ForCausalLM

    if size not in MODEL_SIZES:
        raise ValueError(f"unknown model size {size!r}; expected one of {sorted(MODEL_SIZES)}")
    spec = MODEL_SIZES[size]
    eos_id = tokenizer.convert_tokens_to_ids(EOS_TOKEN)
    config = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_hidden_layers,
        num_attention_heads=spec.num_attention_heads,
        num_key_value_heads=spec.num_key_value_heads,
        max_position_embeddings=spec.max_position_embeddings,
        tie_word_embeddings=False,
        eos_token_id=eos_id,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=None,
        torch_dtype="float32",
    )
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(config)
    model.generation_config = GenerationConfig(eos_token_id=eos_id, pad_token_id=tokenizer.pad_token_id)
    return model


def make_model(
    size: str,
    out_dir: str | os.PathLike,
    seed: int = 0,
    corpus_envs: Iterable[str] = DEFAULT_CORPUS_ENVS,
) -> Path:
    """Build tokenizer + model of `size` into `out_dir` (written atomically); returns the path."""
    if size not in MODEL_SIZES:
        raise ValueError(f"unknown model size {size!r}; expected one of {sorted(MODEL_SIZES)}")
    out = Path(out_dir)
    texts = corpus(corpus_envs, seed=seed)
    tokenizer = build_tokenizer(texts, MODEL_SIZES[size].vocab_size)
    model = build_model(size, tokenizer, seed)
    with atomic_directory(out) as staging:
        tokenizer.save_pretrained(staging)
        model.save_pretrained(staging)
        (staging / "empg_model.json").write_text(
            json.dumps(
                {"size": size, "seed": seed, "corpus_envs": list(corpus_envs), **asdict(MODEL_SIZES[size])},
                indent=2,
            )
        )
    return out


def resolve_model(spec: str) -> Path:
    """A model directory for `spec`: a path; `tiny:`/`small:` (optionally `tiny:seed=3`), built
    offline once; `smollm2:` or a `.gguf` file, converted once; both cached under
    $EMPG_CACHE_DIR/models."""
    size, sep, options = spec.partition(":")
    if sep and size == pretrained.SMOLLM2:
        if options:
            raise ValueError(f"bad model spec {spec!r}: 'smollm2:' takes no options")
        return _gguf_model(pretrained.smollm2_gguf())
    if sep and size in MODEL_SIZES:
        seed = 0
        for item in filter(None, options.split(",")):
            key, _, value = item.partition("=")
            if key != "seed" or not value.isdigit():
                raise ValueError(f"bad model spec {spec!r}: expected '{size}:' or '{size}:seed=N'")
            seed = int(value)
        return _cached(
            f"{size}-seed{seed}",
            [size, seed, asdict(MODEL_SIZES[size]), CORPUS_VERSION],
            lambda out: make_model(size, out, seed=seed),
        )
    path = Path(spec).expanduser()
    if path.suffix == ".gguf" and path.is_file():
        return _gguf_model(path)
    if not (path / "config.json").exists():
        raise FileNotFoundError(
            f"model {spec!r} is neither 'tiny:'/'small:'/'smollm2:', a .gguf file nor a directory with config.json"
        )
    return path


def _cached(stem: str, key: list[Any], build: Callable[[Path], Any]) -> Path:
    """The model directory `$EMPG_CACHE_DIR/models/<stem>-<hash of key>`, built by `build` (which
    writes it atomically) the first time it is asked for."""
    path = cache_dir("models") / f"{stem}-{hashlib.sha1(json.dumps(key).encode()).hexdigest()[:10]}"
    if not (path / "config.json").exists():
        logger.info("building model %s", path)
        build(path)
    return path


def _gguf_model(gguf: Path) -> Path:
    """The model directory converted from `gguf`, keyed by the file's name, size and
    modification time (hashing 100 MB on every run would not pay for itself) and the converter's
    version."""
    stat = gguf.stat()
    return _cached(
        gguf.stem,
        [gguf.name, stat.st_size, stat.st_mtime_ns, pretrained.CONVERTER_VERSION],
        lambda out: pretrained.convert_gguf(gguf, out),
    )


def load(spec: str, dtype: str = "float32"):
    """(tokenizer, model) for a model spec, loaded with the Auto classes, offline."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = resolve_model(spec)
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(
        path, local_files_only=True, dtype=getattr(torch, dtype)
    )
    return tokenizer, model
