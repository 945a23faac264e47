# fastinpo's entry points. The README's two commands are `make demo` and `make test`; CI (.ci/run) runs
# `make lint test`. Each target sets everything up first (scripts/install.sh), once.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.fastinpo-installed
export PY

.PHONY: install demo test test-core test-triton aot lint clean

$(STAMP): pyproject.toml setup.py scripts/install.sh
	VENV=$(VENV) bash scripts/install.sh
	touch $@

install: $(STAMP)

## The main job (until `fastinpo demo` lands): what runs here, then the API end to end on a tiny UNet.
demo: $(STAMP)
	$(VENV)/bin/fastinpo env
	$(VENV)/bin/fastinpo quickstart

## Every CPU test: the core suite, then the Triton kernels through the interpreter.
test: test-core test-triton

test-core: $(STAMP)
	bash scripts/run_pytest.sh -q tests --ignore=tests/triton

# TRITON_INTERPRET must be set before triton is imported: its own process.
test-triton: $(STAMP)
	@if [ -d tests/triton ]; then TRITON_INTERPRET=1 bash scripts/run_pytest.sh --allow-empty -q tests/triton; \
	else echo "[test-triton] no tests/triton yet: no Triton kernel to test"; fi

lint: $(STAMP)
	$(PY) -m ruff check fastinpo kernels tests benchmarks

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .ruff_cache
