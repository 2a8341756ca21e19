# Every install step lives here so that a clean checkout (CI included) can build itself.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
# torch and torchvision are pinned only for this install: they lie on the build machines' disk.
# pyproject.toml keeps a range so a cluster's own torch serves.
TORCH_PINS := torch==2.14.1 torchvision==0.29.1

.PHONY: install demo test check bench clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q $(TORCH_PINS)
	$(BIN)/pip install -q -e '.[dev,clouds,pretrained]'
	touch $(STAMP)

demo: install
	$(BIN)/python -m geoseg.demo

# The import contracts (pyproject.toml, [tool.importlinter]) are part of the tests.
test: install
	$(BIN)/lint-imports --no-cache
	$(BIN)/python -m pytest

# Style, types and the direction of imports; .ci/run and the pre-commit hooks run the same.
check: install
	$(BIN)/ruff check geoseg tests bench jobs
	$(BIN)/ruff format --check geoseg tests bench jobs
	$(BIN)/mypy
	$(BIN)/lint-imports --no-cache

bench: install
	$(BIN)/python -m bench.run --out bench/results.json

clean:
	rm -rf out/ .pytest_cache build *.egg-info
