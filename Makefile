# The two commands of the README:
#   make demo   set up on a fresh Debian machine and run the main job
#   make test   set up and run the whole test suite (what CI runs)
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin

.PHONY: demo test setup system-packages lint typecheck bench clean

demo: setup
	$(BIN)/p2pbuild demo

test: setup
	$(BIN)/ruff check p2pbuild tests bench
	$(BIN)/mypy
	$(BIN)/pytest $(PYTEST_ARGS)
	$(BIN)/python bench/records.py --short

setup: system-packages $(VENV)/.installed

system-packages:
	@tools/install-system-packages

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	touch $@

lint: setup
	$(BIN)/ruff check p2pbuild tests bench

typecheck: setup
	$(BIN)/mypy

bench: setup
	$(BIN)/python bench/records.py

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache .mypy_cache .ruff_cache .hypothesis
