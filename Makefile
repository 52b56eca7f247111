# Two entry points: `make serve` and `make test`. Both build .venv from pyproject.toml first.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
MODEL := models/shapes-vit.onnx

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

# Tools some tests drive for real, from Debian: a Prometheus server, and Chromium with its
# chromedriver for the web page. (Podman for the container test is installed by
# ../shared/container/smoke.sh itself.) Without root or apt the tests that need them skip.
$(VENV)/.system-installed: Makefile | $(BIN)/python
	command -v prometheus >/dev/null || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive \
		apt-get install -y -qq --no-install-recommends prometheus >/dev/null; } || \
		echo "prometheus could not be installed: tests/test_prometheus.py will skip"
	{ command -v chromium && command -v chromedriver; } >/dev/null || { apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
		chromium chromium-driver >/dev/null; } || \
		echo "chromium could not be installed: tests/http/test_web.py will skip"
	touch $@

serve: $(VENV)/.serve-installed
	$(BIN)/vit-serve --model $(MODEL)

test: $(VENV)/.test-installed $(VENV)/.system-installed lint typecheck unit

lint: $(VENV)/.test-installed
	$(BIN)/ruff check .

typecheck: $(VENV)/.test-installed
	$(BIN)/mypy

unit: $(VENV)/.test-installed $(VENV)/.system-installed
	$(BIN)/pytest

clean:
	rm -rf $(VENV) .mypy_cache .pytest_cache .ruff_cache
