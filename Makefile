# Two entry points: `make serve` and `make test`. Both build .venv from pyproject.toml first.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
MODEL := models/shapes-vit.onnx
# `make serve PORT=9000` listens there; unset, vit-serve takes VIT_PORT, else 8000.
PORT ?=

.PHONY: serve test lint typecheck unit clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

# Stamps record which install a target has done, so a second run installs nothing.
$(VENV)/.serve-installed: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e .
	touch $@

$(VENV)/.test-installed: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e '.[export,import,dev]'
	touch $@ $(VENV)/.serve-installed

# Debian packages some tests drive for real: the package, the command it provides, what it is for.
define SYSTEM_PACKAGES
prometheus prometheus a Prometheus server (and promtool) for tests/test_prometheus.py
chromium chromium headless Chromium, to drive the web page in tests/http/test_web.py
chromium-driver chromedriver the chromedriver Selenium drives that Chromium through
endef
export SYSTEM_PACKAGES

# Says which of them are missing and what for, then installs them with apt-get when run as root;
# otherwise the tests that need them skip, each naming what is missing. The stamp is written only
# once nothing is missing, so a later run as root still installs them. The container test uses the
# docker or podman it finds, or ../shared/container/smoke.sh, which installs podman itself as root.
$(VENV)/.system-installed: Makefile | $(BIN)/python
	@missing=$$(echo "$$SYSTEM_PACKAGES" | while read -r package tool why; do \
		command -v "$$tool" >/dev/null || echo "  $$package: $$why"; done); \
	packages=$$(echo "$$missing" | cut -d: -f1); \
	if [ -z "$$missing" ]; then \
		touch $@; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		echo "Installing these Debian packages with apt-get, as root:"; echo "$$missing"; \
		{ apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
			--no-install-recommends $$packages >/dev/null && touch $@; } || \
			echo "apt-get failed: the tests that need these packages skip"; \
	else \
		echo "Missing Debian packages (installing them needs root and apt-get):"; echo "$$missing"; \
		echo "The tests that need them skip. As root: apt-get install" $$packages; \
	fi
	@if [ -e ../shared/container/smoke.sh ] && ! command -v podman >/dev/null \
		&& [ "$$(id -u)" = 0 ]; then \
		echo "tests/test_container.py: ../shared/container/smoke.sh installs podman with apt-get"; fi

serve: $(VENV)/.serve-installed
	$(BIN)/vit-serve --model $(MODEL) $(if $(PORT),--port $(PORT))

test: $(VENV)/.test-installed $(VENV)/.system-installed lint typecheck unit

lint: $(VENV)/.test-installed
	$(BIN)/ruff check .

typecheck: $(VENV)/.test-installed
	$(BIN)/mypy

unit: $(VENV)/.test-installed $(VENV)/.system-installed
	$(BIN)/pytest

clean:
	rm -rf $(VENV) .mypy_cache .pytest_cache .ruff_cache
