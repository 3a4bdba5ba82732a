# Two entry points: `make quickstart` trains on bundled data, `make test` runs the suite.
# Both create .venv on first use and reinstall only when pyproject.toml changes
# (test extras: timm/transformers as references, onnx/onnxruntime, the Hydra sweep plugins).
VENV ?= .venv
PY := $(VENV)/bin/python
PYTEST_ARGS ?=

.PHONY: install quickstart test test-all lint clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test,sweep]'
	touch $@

quickstart: install
	$(PY) -m vitexp experiment=digits

test: install
	$(PY) -m ruff check .
	$(PY) -m pytest $(PYTEST_ARGS)

test-all: install
	$(PY) -m pytest -m '' $(PYTEST_ARGS)

lint: install
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

clean:
	rm -rf $(VENV) build dist *.egg-info
