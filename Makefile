# fastinpo's entry points. The README's two commands are `make demo` and `make test`; CI (.ci/run) runs
# `make lint test`. Each target sets everything up first (scripts/install.sh), once.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.fastinpo-installed
export PY
# torch.compile's cache per checkout: /tmp/torchinductor_$USER is shared by every worktree on a machine, and a graph
# cached from another checkout's version of a custom op (e.g. fastinpo_triton::dpo_fwd) fails with a schema error
export TORCHINDUCTOR_CACHE_DIR ?= $(CURDIR)/.cache/torchinductor
# torch's JIT-built extensions (DeepSpeed's CPU comm op, built at every DeepSpeed start-up) per checkout as well:
# the build flags hold the checkout's venv path, so checkouts sharing ~/.cache/torch_extensions rebuild it in turn
# (minutes each, and a killed build leaves a lock that stalls every later start)
export TORCH_EXTENSIONS_DIR ?= $(CURDIR)/.cache/torch_extensions

.PHONY: install demo test test-core test-triton test-distributed test-two-nodes bench-smoke lint clean gpu-prepare \
	gpu-dry-run test-gpu

$(STAMP): pyproject.toml setup.py scripts/install.sh
	VENV=$(VENV) bash scripts/install.sh
	touch $@

install: $(STAMP)

## The main job: a complete preference alignment on the CPU (InPO vs Diffusion-DPO vs SFT), report in runs/demo.
demo: $(STAMP)
	$(VENV)/bin/fastinpo env
	$(VENV)/bin/fastinpo demo --out runs/demo

## Every CPU test: the core suite, the Triton kernels through the interpreter, the 2-process DeepSpeed tier, and
## two simulated nodes (network namespaces; needs root).
test: test-core test-triton test-distributed test-two-nodes

test-core: $(STAMP)
	bash scripts/run_pytest.sh -q tests --ignore=tests/triton -m "not distributed"

# DeepSpeed ZeRO on CPU (gloo, 2 processes): its own tier, so a hang there cannot hide the core results.
test-distributed: $(STAMP)
	DS_ACCELERATOR=cpu bash scripts/run_pytest.sh --allow-empty -q tests -m "distributed and not two_nodes" \
		--ignore=tests/triton

# Two nodes for real: two network namespaces joined by a veth pair, one torchrun per namespace (docs/DISTRIBUTED.md).
# Needs root (CAP_SYS_ADMIN) and iproute2; skipped with the reason elsewhere, unless FASTINPO_REQUIRE_NETNS=1
# (.ci/run) makes that a failure. About 2-3 minutes on 2 CPU cores.
test-two-nodes: $(STAMP)
	DS_ACCELERATOR=cpu bash scripts/run_pytest.sh -q -rs tests/test_two_nodes.py -m two_nodes

## CPU smoke of the benchmarks (ratios only; rows go to a scratch folder, not benchmarks/results/).
bench-smoke: $(STAMP)
	@mkdir -p .bench-smoke
	@if [ -f benchmarks/bench_kernels.py ]; then $(PY) benchmarks/bench_kernels.py --smoke --out .bench-smoke; fi
	@if [ -f benchmarks/bench_train_step.py ]; then $(PY) benchmarks/bench_train_step.py --smoke --out .bench-smoke; fi

# TRITON_INTERPRET must be set before triton is imported: its own process.
test-triton: $(STAMP)
	@if [ -d tests/triton ]; then TRITON_INTERPRET=1 bash scripts/run_pytest.sh --allow-empty -q tests/triton; \
	else echo "[test-triton] no tests/triton yet: no Triton kernel to test"; fi

## The GPU kit (docs/GPU.md): the wheels the GPU image lacks, and the kit's CPU dry run (CI runs it).
gpu-prepare: $(STAMP)
	PY=$(PY) bash scripts/gpu/prepare.sh

gpu-dry-run: $(STAMP)
	PY=$(PWD)/$(PY) bash scripts/gpu/run.sh --dry-run

# On a CUDA machine: the GPU tests with Triton compiled (never the interpreter), and every op on CUDA tensors.
test-gpu: $(STAMP)
	TRITON_INTERPRET=0 bash scripts/run_pytest.sh -q -m gpu tests/triton tests/test_extension.py -rs
	TRITON_INTERPRET=0 bash scripts/run_pytest.sh -q tests/test_ops_cuda.py -rs

lint: $(STAMP)
	$(PY) -m ruff check fastinpo kernels tests benchmarks scripts

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .ruff_cache
