# Quick start:  make run   (sets up .venv and runs the embedded digits study)
#               make test  (sets up .venv and runs the test suite)
VENV    ?= .venv
PYTHON  ?= python3
CORES   ?= 2
CONFIG  ?= config/config.yaml
PY      := $(VENV)/bin/python
STAMP   := $(VENV)/.mergemix-installed
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)

.PHONY: install run test test-fast lint format dry-run clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[test]"
	touch $(STAMP)

install: $(STAMP)

run: $(STAMP)
	$(VENV)/bin/snakemake --profile workflow/profiles/default --cores $(CORES) --configfile $(CONFIG)

dry-run: $(STAMP)
	$(VENV)/bin/snakemake --profile workflow/profiles/default --cores $(CORES) --configfile $(CONFIG) -n

# lint first: snakemake --lint (tools/snakemake_lint.py allows only the lints that are design
# decisions), snakefmt, ruff check and ruff format
lint: $(STAMP)
	$(PY) tools/snakemake_lint.py
	$(VENV)/bin/snakefmt --check Snakefile workflow/rules
	$(VENV)/bin/ruff check src tests benchmarks tools
	$(VENV)/bin/ruff format --check src tests benchmarks tools

format: $(STAMP)
	$(VENV)/bin/snakefmt Snakefile workflow/rules
	$(VENV)/bin/ruff check --fix src tests benchmarks tools
	$(VENV)/bin/ruff format src tests benchmarks tools

# the whole suite on TEST_WORKERS pytest-xdist workers; each module runs whole on one worker, so
# its module fixtures (study runs) run once; modules in tests/conftest.py's order, slowest first
TEST_WORKERS ?= 2
test: $(STAMP) lint
	$(PY) -m pytest -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder --durations=15

# the unit tests only (every test not marked workflow, slurm or slow), two workers: under 2 minutes
test-fast: $(STAMP)
	$(PY) -m pytest -m unit -n 2 -q

clean:
	rm -rf results .snakemake
