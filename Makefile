# Two commands for a fresh machine: `make repro` builds the experiment, `make test` runs the tests.
PYTHON ?= python3
VENV ?= .venv
BIN := $(abspath $(VENV))/bin
# Stage commands (`python -m stages.X`) and dvc itself must come from the venv.
export PATH := $(BIN):$(PATH)
REQ_HASH := $(shell cat requirements.txt requirements-nodeps.txt | sha256sum | cut -c1-16)
STAMP := $(VENV)/.installed-$(REQ_HASH)
NODE_STAMP := node_modules/.package-lock.json
PYTEST_ARGS ?=

.PHONY: venv data repro test plots bench clean-venv

venv: $(STAMP)

# Reinstalls only when requirements.txt changes; pip skips what the venv already has.
$(STAMP): requirements.txt requirements-nodeps.txt
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --upgrade "pip>=24" "setuptools<81" wheel
	$(BIN)/python -m pip install -r requirements.txt
	$(BIN)/python -m pip install --no-deps -r requirements-nodeps.txt
	@rm -f $(VENV)/.installed-*
	@touch $@

# LFW into data/sources/lfw: linked from LFW_SOURCE when set, else downloaded and verified.
# Real masked photos for the mask bank into data/sources/rmfd: linked from MASK_BANK_SOURCE when
# set, else an empty folder (no bank: procedural masks only).
data: venv
	$(BIN)/python -m pipeline.data.lfw_source --dest data/sources/lfw
	$(BIN)/python -m pipeline.mask.bank_stage --dest data/sources/rmfd

repro: data
	$(BIN)/dvc repro

test: venv $(NODE_STAMP)
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# Offline plots: vega, vega-lite and vega-embed from the npm registry once (package-lock.json pins
# them), inlined into the page `dvc plots show` writes (dvc_plots/index.html), which then loads nothing.
$(NODE_STAMP): package.json package-lock.json
	npm ci --ignore-scripts --no-audit --no-fund
	@touch $@

plots: venv $(NODE_STAMP)
	$(BIN)/python scripts/plots_offline.py --out build/plots_template.html
	$(BIN)/dvc plots show --html-template build/plots_template.html

bench: venv
	$(BIN)/python benchmarks/ingest.py

clean-venv:
	rm -rf $(VENV)
