# Every install step lives here so that a clean checkout (CI included) can build itself.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
# torch and torchvision are pinned only for this install: they lie on the build machines' disk.
# pyproject.toml keeps a range so a cluster's own torch serves.
TORCH_PINS := torch==2.14.1 torchvision==0.29.1

.PHONY: install demo test bench clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q $(TORCH_PINS)
	$(BIN)/pip install -q -e '.[dev,clouds]'
	touch $(STAMP)

demo: install
	$(BIN)/python -m geoseg.demo

test: install
	$(BIN)/python -m pytest

bench: install
	$(BIN)/python -m bench.run --out bench/results.json

clean:
	rm -rf out/ .pytest_cache build *.egg-info
