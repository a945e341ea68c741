# Quick start: `make demo` then `make test`. Both create .venv with the pinned requirements on first use.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install demo test bench clean

install: $(STAMP)

$(STAMP): requirements.txt requirements-label.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	$(PY) -m pip install --quiet --no-deps -r requirements-label.txt
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m monai.bundle run --config_file configs/demo.json

# pytest exits 5 when it collects no test; that is not a failure of the suite.
test: $(STAMP)
	$(PY) -m pytest -q tests; rc=$$?; if [ $$rc -eq 5 ]; then echo "no tests collected"; exit 0; fi; exit $$rc

bench: $(STAMP)
	$(PY) -m scripts.bench all
	$(PY) -m scripts.bench enhance
	$(PY) -m scripts.bench posterior

clean:
	rm -rf $(VENV) outputs .pytest_cache
