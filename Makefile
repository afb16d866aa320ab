# The few commands everyone runs. `make demo` and `make test` do all set-up on a fresh machine.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
OUT ?= out/demo

.PHONY: venv demo test lint format bench clean

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
	rm -rf $(VENV) out .pytest_cache .ruff_cache
