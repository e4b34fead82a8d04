PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: serve test lint bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	touch $(STAMP)

serve: $(STAMP)
	$(BIN)/meshd serve --config meshd.toml

test: $(STAMP)
	$(BIN)/ruff check meshd plugins tests
	$(BIN)/pytest -q

lint: $(STAMP)
	$(BIN)/ruff check meshd plugins tests
	$(BIN)/ruff format --check meshd plugins tests

bench: $(STAMP)
	$(BIN)/meshd bench sim --json

clean:
	rm -rf $(VENV) data .pytest_cache
