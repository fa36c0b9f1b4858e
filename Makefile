# Every environment is built from nothing by these targets; re-running them is quick (stamp files).
PYTHON ?= python3.11
VENV := .venv
VENV_SGLANG := .venv-sglang
PIP := $(VENV)/bin/pip
PY := $(VENV)/bin/python
MCORE_VERSION := 0.19.2

.PHONY: setup setup-sglang test test-fast demo clean-env

setup: $(VENV)/.stamp

$(VENV)/.stamp: requirements/trainer.txt requirements/pin.txt setup.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q -c requirements/pin.txt torch==2.13.0
	$(PIP) install -q -c requirements/pin.txt -r requirements/trainer.txt
	# megatron-core 0.19.2 declares Python>=3.12 but its core runs on 3.11 (see docs/environments.md).
	$(PIP) install -q -c requirements/pin.txt --ignore-requires-python --no-deps megatron-core==$(MCORE_VERSION)
	$(PIP) install -q -c requirements/pin.txt --no-deps -e .
	touch $@

setup-sglang: $(VENV_SGLANG)/.stamp

$(VENV_SGLANG)/.stamp: requirements/sglang-cpu.txt requirements/pin.txt
	bash scripts/setup_sglang_cpu.sh $(PYTHON) $(VENV_SGLANG)
	touch $@

test: setup setup-sglang
	$(PY) -m pytest -q tests

test-fast: setup
	$(PY) -m pytest -q tests/unit

demo: setup setup-sglang
	$(PY) -m megatron_topd.cli demo --config examples/cpu_demo.yaml

clean-env:
	rm -rf $(VENV) $(VENV_SGLANG)
