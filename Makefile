# `make run` starts the gateway on its embedded defaults; `make test` runs the whole suite, the browser
# tests included. Both create .venv on first use: torch's CPU wheel first (pip install torch==2.13.0),
# then the project.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
HOST ?= 127.0.0.1
PORT ?= 8000

.PHONY: run test browser check install bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e '.[engine,test]'
	touch $(STAMP)

install: $(STAMP)

run: $(STAMP)
	$(BIN)/kontext serve --host $(HOST) --port $(PORT)

test: $(STAMP) browser
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# The browser the web tests drive (tests/test_web.py looks for `chromium` on PATH or /usr/bin/chromium):
# Debian's chromium, installed with apt-get when it is missing (through sudo when not root). When that
# cannot be done, stop and say the one command to run: a suite that silently skips its browser tests
# looks green and proves less. SKIP_BROWSER=1 runs the suite without them (they skip, saying why).
browser:
ifeq ($(SKIP_BROWSER),)
	@command -v chromium >/dev/null 2>&1 || test -x /usr/bin/chromium || { \
		echo "make: installing Debian's chromium for the browser tests (tests/test_web.py)"; \
		SUDO=$$(test "$$(id -u)" -eq 0 || echo sudo); \
		$$SUDO apt-get update -qq && $$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; \
	} || { \
		echo "make: could not install chromium, which the browser tests drive. Run:" >&2; \
		echo "    sudo apt-get install -y chromium" >&2; \
		echo "then make test again (or make test SKIP_BROWSER=1 to run the suite without the browser tests)." >&2; \
		exit 1; \
	}
else
	@echo "make: SKIP_BROWSER is set: the browser tests will skip"
endif

# The gate: lint, format and types (ruff and mypy come with the test extra).
check: $(STAMP)
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks
	$(BIN)/mypy

bench: $(STAMP)
	$(BIN)/python benchmarks/http_bench.py
	$(BIN)/python benchmarks/startup.py

clean:
	rm -rf $(VENV) .pytest_cache
