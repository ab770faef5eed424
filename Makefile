# The two commands: `make test` and `make demo`. Both create .venv when it is missing.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.compact-hooks-installed
PYTEST_ARGS ?=

.PHONY: test demo install lint clean

install: $(STAMP)

# torch==2.13.0 first: a package asking for an unpinned torch would otherwise pull a CUDA build.
# [dev] = [all] (every runtime extra) + [test] (pytest, hypothesis, ruff, triton): what `make test` needs.
$(STAMP): setup.py
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet torch==2.13.0
	DS_BUILD_OPS=0 $(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

test: $(STAMP)
	$(BIN)/pytest $(PYTEST_ARGS)

# FLUX-architecture inference (embedded trained digits model, classes 0-9, 20 steps) on 2 CPU ranks with int2 Ulysses.
demo: $(STAMP)
	OMP_NUM_THREADS=1 $(BIN)/python -m torch.distributed.run --standalone --nproc-per-node 2 \
		-m compact_hooks.integrations.diffusers.job --config ulysses-int2 --out out/demo
	$(BIN)/compact-hooks report out/demo/stats.json --out out/demo/report.png
	@echo "images: out/demo/grid.png, image_NNN.png (exact reference: out/demo/reference_grid.png, reference_NNN.png)"
	@echo "stats: out/demo/stats.json   plot: out/demo/report.png"

lint: $(STAMP)
	$(BIN)/ruff check .

clean:
	rm -rf $(VENV) out .pytest_cache .hypothesis
