# Two entry points: `make quickstart` trains on bundled data, `make test` runs the checks and
# the fast test tier (unit and contract tests, one smoke test per command: what to run after
# every change); `make test-all` runs every test (the markers slow, sweep, ddp, signals, wandb
# and slurm in pyproject.toml, which the fast tier leaves out), as CI does. All create .venv on first use and reinstall only when pyproject.toml or
# constraints.txt changes. The quickstart installs the runtime dependencies only; the tests
# add the test extras (timm/transformers as references, onnx/onnxruntime, the Hydra sweep
# plugins and Ray, ruff, mypy, import-linter) and the data extra (datasets, webdataset).
# Versions are pinned by constraints.txt (the ones CI last passed with); `make CONSTRAINTS= test`
# installs unpinned.
VENV ?= .venv
PY := $(VENV)/bin/python
CONSTRAINTS ?= constraints.txt
# setuptools' editable install of this flat layout says "Editable installation ... be careful
# with folders named like your package" as a warning, for want of another channel (its class is
# InformationOnly: pypa/packaging-problems#558); that one message is filtered, no other.
PIP_INSTALL = PYTHONWARNINGS="ignore:Editable installation" $(PY) -m pip install --quiet $(if $(CONSTRAINTS),-c $(CONSTRAINTS))
PYTEST_ARGS ?=

.PHONY: install install-dev quickstart test test-all lint constraints clean

install: $(VENV)/.runtime
install-dev: $(VENV)/.dev

$(VENV)/.runtime: pyproject.toml $(CONSTRAINTS)
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PIP_INSTALL) -e .
	touch $@

$(VENV)/.dev: $(VENV)/.runtime
	$(PIP_INSTALL) -e '.[test,sweep,ray,data]'
	# vitexp's Optuna sweeper replaced hydra-optuna-sweeper (optuna<3): out of environments made before.
	$(PY) -m pip uninstall --quiet --yes hydra-optuna-sweeper 2>/dev/null || true
	touch $@

quickstart: install
	$(PY) -m vitexp experiment=digits

lint: install-dev
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(VENV)/bin/lint-imports
	$(PY) -m mypy

# PYTEST_ARGS="-m sweep" runs one marker's tests instead (a later -m replaces pyproject's).
# The fast tier runs on every core (pytest-xdist; a test file stays on one worker, so its
# session fixtures are built once); the full tier runs in one process, as its sweeps, DDP and
# Slurm tests start processes of their own.
test: lint
	$(PY) -m pytest -n auto --dist loadfile $(PYTEST_ARGS)

# -m '' lifts pyproject's selection: every test, marked or not.
test-all: lint
	$(PY) -m pytest -m '' $(PYTEST_ARGS)

# After a green CI run: pin what it installed.
constraints: install-dev
	echo "# The versions CI last passed with (pip freeze of the test environment; make constraints writes it)." > $(CONSTRAINTS)
	$(PY) -m pip freeze --exclude-editable >> $(CONSTRAINTS)

clean:
	rm -rf $(VENV) build dist *.egg-info
