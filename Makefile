# Every environment is built from nothing by these targets; re-running them is quick (stamp files).
PYTHON ?= python3.11
VENV := .venv
VENV_SGLANG := .venv-sglang
VENV_NEMORUN := .venv-nemorun
PIP := $(VENV)/bin/pip
PY := $(VENV)/bin/python
MCORE_VERSION := 0.19.2

.PHONY: setup setup-sglang setup-nemorun setup-slurm test test-fast test-slurm demo experiment clean-env

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

# NeMo-Run (the launcher side, no torch) in its own environment: its dependencies must not move the trainer's.
setup-nemorun: $(VENV_NEMORUN)/.stamp

$(VENV_NEMORUN)/.stamp: requirements/nemorun.txt
	test -x $(VENV_NEMORUN)/bin/python || $(PYTHON) -m venv $(VENV_NEMORUN)
	$(VENV_NEMORUN)/bin/pip install -q --upgrade pip
	$(VENV_NEMORUN)/bin/pip install -q -r requirements/nemorun.txt
	PYTHONPATH=. $(VENV_NEMORUN)/bin/python -c "import nemo_run, megatron_topd.launch.nemo_run"
	touch $@

# Slurm 22.05 + munge + slurmdbd + MariaDB + shellcheck from apt (root only; tests/slurm skip when not root).
setup-slurm:
	bash scripts/setup_slurm.sh

test: setup setup-sglang setup-nemorun setup-slurm
	$(PY) -m pytest -q --durations=25 tests

test-slurm: setup setup-sglang setup-nemorun setup-slurm
	$(PY) -m pytest -q tests/slurm

test-fast: setup
	$(PY) -m pytest -q tests/unit

demo: setup setup-sglang
	$(PY) -m megatron_topd.cli demo --config examples/cpu_demo.yaml

# The TOPD-vs-OPD comparison (5 variants x 3 seeds on the demo's task; docs/results.md). ARGS: e.g. --seeds 0,1,2,3
# PRESET=surface: the surface-form task, two teacher arms, 5 variants x 5 paired seeds (issue 26; docs/results.md;
# 89.7 min on 2 cores, assets included)
experiment: setup setup-sglang
	$(PY) -m megatron_topd.cli experiment $(if $(PRESET),--preset $(PRESET)) $(ARGS)

clean-env:
	rm -rf $(VENV) $(VENV_SGLANG) $(VENV_NEMORUN)

# The step-time model against a measured CPU demo step, phase by phase (issue 24, docs/planning.md): the CPU profile
# calibrated, then the demo step measured right after it on its figures; about 3 minutes. Run it under the lock:
# flock /tmp/topd-heavy.lock make bench-step-model
.PHONY: bench-step-model
bench-step-model: setup setup-sglang
	$(PY) benchmarks/calibrate_cpu_profile.py --out runs/calibrate_cpu/profile.json
	$(PY) benchmarks/bench_step_time_model.py --profile-json runs/calibrate_cpu/profile.json $(ARGS)

# Weight sync at TP2 x PP2 to 2 CPU SGLang servers, the rank-0 funnel beside the per-stage push (issue 25,
# docs/rollout.md): about 10 minutes on 2 cores; not part of make test. ARGS: e.g. --repeats 3 --servers 1
.PHONY: bench-weight-sync
bench-weight-sync: setup setup-sglang
	OMP_NUM_THREADS=1 $(PY) benchmarks/bench_weight_sync.py $(ARGS)

# The timing-sensitive tests run again and again (issue 22): RUNS=20 BURN=1 adds a busy loop per core beside them.
.PHONY: test-repeat
RUNS ?= 20
test-repeat: setup setup-sglang
	$(PY) scripts/repeat_tests.py --runs $(RUNS) $(if $(BURN),--burn) $(TESTS)

# The requeue test's Slurm fault job RUNS times on one local cluster, against one uninterrupted reference (issue 22):
# about 3.5 minutes a run on 2 cores, plus the cluster and the reference (2 minutes). BURN=1 as above.
.PHONY: test-repeat-job
test-repeat-job: setup setup-sglang setup-nemorun setup-slurm
	$(if $(BURN),$(PY) scripts/repeat_tests.py --burn-beside -- )$(PY) -m pytest -q -p no:cacheprovider --durations=0 \
		tests/slurm/test_jobs.py -k "scontrol or lost_server" --job-runs $(RUNS)

# TOPD on the demo task with a teacher of another tokenizer (issue 27, docs/remote_teacher.md "A run on the demo
# task"): the demo's trained teacher behind its own character-level tokenizer, 60 steps; not part of make test.
# Under the lock: flock /tmp/topd-heavy.lock make demo-cross [ARGS="train.steps=120"]
.PHONY: demo-cross
demo-cross: setup setup-sglang
	$(PY) scripts/demo_cross.py $(ARGS)
