# The two commands a user needs: `make demo` and `make test`.
# Each creates .venv if missing and installs what it needs.

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: demo test install benchmark clean

$(STAMP): pyproject.toml
	test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/pgsink demo

test: $(STAMP)
	$(BIN)/pytest -q $(PYTEST_ARGS)

benchmark: $(STAMP)
	$(BIN)/python -m benchmarks --help

clean:
	rm -rf $(VENV) build dist *.egg-info
