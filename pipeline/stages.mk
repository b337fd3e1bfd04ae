# kdcache's stage graph. One file, shipped inside the package: the repository's Makefile includes it, and so
# does the Makefile `kdcache init` writes into a project of one's own (it asks the installed kdcache where this
# file is, so the rules always match the kdcache they call).
#
# Each stage is a file target RUN/.stages/<stage>.done, written when the stage finishes; it depends on its
# upstream stage and on RUN/.stages/<stage>.config, which `kdcache stamps` rewrites only when the config fields
# that stage depends on change. So `make` reruns exactly the stale stages (change train.lr -> train and evaluate;
# change precompute.samples -> precompute onward), a killed stage is rerun (and resumes), and `make -n` shows the
# plan.
#
# Variables: CONFIG (YAML file), RUN (run folder; default: the config's run_dir), ARGS (extra
# `-s section.field=value` overrides), ASSISTANT=1 (the student learns through the MiniDisc teacher assistant:
# train depends on the assistant's cache), OVERWRITE=1 (a stage may replace outputs made with other settings:
# without it a stage whose settings changed stops and says so, and nothing is thrown away).
# The including Makefile sets PYTHON (the interpreter kdcache is installed in) and may set KD_INSTALL (a target
# that installs kdcache: the stages wait for it) and KD_SKIP_GOALS (its own goals that need no run folder).
CONFIG ?=
ARGS ?=
ASSISTANT ?=
OVERWRITE ?=
KD = $(PYTHON) -m kdcache.pipeline.cli
# the helpers make runs while it reads this file, without the CLI's library imports (~1.5 s each time)
KD_MAKE = $(PYTHON) -m kdcache.pipeline.make
KD_INPUTS = $(if $(CONFIG),-c $(CONFIG)) $(ARGS) $(if $(ASSISTANT),-s train.source=assistant)
OPTS = --run-dir $(RUN) $(KD_INPUTS)
OVERWRITE_OPT = $(if $(OVERWRITE),--overwrite)
S = $(RUN)/.stages
TRAIN_SIGNAL = $(if $(ASSISTANT),$(S)/precompute-assistant.done,$(S)/precompute.done)

# RUN defaults to the config's run_dir, so `make CONFIG=my.yaml` works where the YAML says. kdcache reads the
# config on the first use of $(RUN), once (the eval replaces this definition by the answer); a config it cannot
# read stops make with kdcache's own one-line error above make's.
ifndef RUN
RUN = $(eval RUN := $(or $(shell $(KD_MAKE) run-dir $(KD_INPUTS)),$(error kdcache (PYTHON=$(PYTHON)) could not \
	read the run folder from the config: the line above says why)))$(RUN)
endif

.PHONY: help clean prepare precompute assistants precompute-assistant train evaluate report

help:  ## list targets
	@grep -hE '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | sed 's/:.*## /\t/' | expand -t 22

# RUN may come from a config: never delete the folder make runs in, or one that holds it
clean:  ## delete the run folder (RUN)
	@case "$(CURDIR)/" in "$(patsubst %/,%,$(abspath $(RUN)))/"*) \
		echo "make clean: RUN=$(RUN) holds this folder ($(CURDIR)): not deleting it" >&2; exit 2;; esac
	rm -rf $(RUN)

# The stage graph needs the run folder, so it is set up only for goals that may reach a stage: not for the
# including Makefile's own goals (install, test, ...: they run before kdcache is installed) nor help and clean.
ifneq ($(filter-out help clean $(KD_SKIP_GOALS),$(or $(MAKECMDGOALS),$(.DEFAULT_GOAL))),)

# Refresh the config stamps while the Makefile is read, so even `make -n` sees what changed.
_ := $(shell $(KD_MAKE) stamps $(OPTS) 2>/dev/null)
$(S)/%.config: | $(KD_INSTALL)
	$(KD_MAKE) stamps $(OPTS)

prepare: $(S)/prepare.done  ## tokenise the dataset (RUN/tokens)
precompute: $(S)/precompute.done  ## run the teacher once, cache its signal (RUN/signals/teacher)
assistants: $(S)/assistants.done  ## MiniDisc: prune, one slimmable trial, choose by P + λ·sparsity (RUN/assistants)
precompute-assistant: $(S)/precompute-assistant.done  ## cache the chosen assistant's signal (RUN/signals/assistant)
train: $(S)/train.done  ## train the student from the cache (RUN/student; ASSISTANT=1: from the assistant's)
evaluate: $(S)/evaluate.done  ## held-out metrics (RUN/eval)
report: $(S)/evaluate.done  ## Markdown + HTML report with plots (RUN/report)
	$(KD) report $(RUN)

# A stage rerun because its settings changed refuses to replace what the old settings made unless OVERWRITE=1;
# with unchanged inputs the stages resume or skip finished work.
$(S)/prepare.done: $(S)/prepare.config | $(KD_INSTALL)
	$(KD) prepare $(OPTS) $(OVERWRITE_OPT)

$(S)/precompute.done: $(S)/prepare.done $(S)/precompute.config
	$(KD) precompute $(OPTS) $(OVERWRITE_OPT)

$(S)/assistants.done: $(S)/precompute.done $(S)/assistants.config
	$(KD) assistants $(OPTS) $(OVERWRITE_OPT)

$(S)/precompute-assistant.done: $(S)/assistants.done $(S)/precompute.config
	$(KD) precompute --source assistant $(OPTS) $(OVERWRITE_OPT)

$(S)/train.done: $(TRAIN_SIGNAL) $(S)/train.config
	$(KD) train $(OPTS) $(OVERWRITE_OPT)

$(S)/evaluate.done: $(S)/train.done $(S)/evaluate.config
	$(KD) evaluate $(OPTS)

endif
