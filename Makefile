# The two commands of the README:
#   make demo   set up on a fresh Debian machine and run the main job
#   make test   set up and run the whole test suite (what CI runs)
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin

.PHONY: demo test setup system-packages lint typecheck bench clean

demo: setup
	$(BIN)/p2pbuild demo

# pytest runs last so that its summary line closes the output.
test: setup
	$(BIN)/ruff check p2pbuild tests bench
	$(BIN)/mypy
	$(BIN)/lint-imports
	$(MAKE) --no-print-directory bench BENCH_ARGS=--short
	$(BIN)/pytest $(PYTEST_ARGS)

setup: system-packages $(VENV)/.installed

system-packages:
	@tools/install-system-packages

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	$(BIN)/pip install --quiet --no-deps koji==1.36.1
	touch $@

lint: setup
	$(BIN)/ruff check p2pbuild tests bench
	$(BIN)/lint-imports

typecheck: setup
	$(BIN)/mypy

# Every benchmark prints one JSON object; BENCH_ARGS=--short is the CI mode.
BENCHMARKS := records dht internet churn node dispatch soak leases web wake
bench: setup
	@for b in $(BENCHMARKS); do \
		echo "== bench/$$b.py $(BENCH_ARGS)"; \
		$(BIN)/python bench/$$b.py $(BENCH_ARGS) || exit 1; \
	done

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache .mypy_cache .ruff_cache .hypothesis
