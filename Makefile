# The two commands a newcomer needs: `make serve` and `make test`.
# Both create .venv and install everything on first use.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
LISTEN ?= 127.0.0.1:50051
PYTEST_ARGS ?=

.PHONY: serve test proto bench docs clean

$(STAMP): pyproject.toml clients/python/pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]' -e ./clients/python
	touch $(STAMP)

## serve: run the gateway on $(LISTEN) with the embedded local AWS backend (nothing is billed)
serve: $(STAMP)
	$(BIN)/metering-gateway serve --local --listen $(LISTEN)

## test: run every test
test: $(STAMP)
	$(BIN)/python -m pytest $(PYTEST_ARGS)

## proto: regenerate the Python code from protos/ (never edit it by hand)
proto: $(STAMP)
	$(BIN)/python tools/genproto.py

## bench: the pass-through benchmark (figures in README.md)
bench: $(STAMP)
	$(BIN)/python benchmarks/passthrough.py

clean:
	rm -rf $(VENV) build *.egg-info clients/python/build clients/python/src/*.egg-info

## docs: rewrite the README's settings table from gateway/config.py
docs: $(STAMP)
	$(BIN)/python tools/settings_table.py
