# dstack-fleet entry points. Everything runs from a fresh clone with only Python (3.11, 3.12 or 3.13) and
# PyPI: the first target that needs Python creates .venv and installs the hash-locked requirements.
# `make` alone (or `make help`) lists the targets.
.DEFAULT_GOAL := help
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-$(shell cat requirements.txt requirements-dev.txt | cksum | cut -d' ' -f1)

# Targets that run Python depend on this; tests that call make from inside the suite set it empty.
PY_DEPS ?= $(STAMP)

STACK  ?= dev
FORMAT ?= text
PLAN_JSON ?=
PASS   ?= preview
BASE   ?= HEAD

.PHONY: help venv test test-fast test-random plan golden readme preview up rollout lock collect gc lock-deps diff bench clean

# ACK names a refusal to override: group:<group> (over maxUnavailable), identity:app:<app> (prod identity).
ACK_ARG = $(if $(ACK),--ack '$(ACK)')

# FLEET_ROOT plans another checkout's stacks with this code (tests use it on temporary copies).
ROOT_ARG = $(if $(FLEET_ROOT),--root $(FLEET_ROOT))
DEBUG_ARG = $(if $(DEBUG),--debug)
PLAN_CMD = $(PY) -m fleet $(ROOT_ARG) $(DEBUG_ARG) plan --stack $(STACK) --format $(FORMAT) --pass $(PASS) $(if $(VERBOSE),--verbose) $(if $(PLAN_JSON),--json $(PLAN_JSON))
DIFF_CMD = $(PY) -m fleet $(ROOT_ARG) $(DEBUG_ARG) diff --stack $(STACK) --base $(BASE) $(if $(DIFF_MD),--output $(DIFF_MD))

# `make plan` and `make diff` must exit with the tool's own code: 0 ok, 1 a mandatory check failed,
# 2 bad input. GNU make reports every failing recipe as 2 and exits 1 only in question mode (-q), so
# when one of them is the only goal the tool runs while the Makefile is read, its output is printed,
# and code 1 is passed on through question mode; other codes fail the recipe below. GNU make has no
# other exit status: a program failure (the tool's 3) leaves make with 2, after the tool's message.
# The sub-make that builds .venv gets PYTHON explicitly: command-line variables reach sub-makes only
# through MAKEFLAGS, which is not exported yet while the Makefile is being read.
TOOL_GOAL := $(filter plan diff,$(MAKECMDGOALS))
ifneq ($(TOOL_GOAL),)
ifeq ($(words $(MAKECMDGOALS)),1)
$(if $(PY_DEPS),$(shell $(MAKE) --no-print-directory -s venv PYTHON='$(PYTHON)' >&2))
TOOL_OUT := $(shell mktemp)
TOOL_STATUS := $(shell $(if $(filter plan,$(TOOL_GOAL)),$(PLAN_CMD),$(DIFF_CMD)) >$(TOOL_OUT); echo $$?)
TOOL_TEXT := $(file <$(TOOL_OUT))
$(if $(TOOL_TEXT),$(info $(TOOL_TEXT)))
$(shell rm -f $(TOOL_OUT))
ifeq ($(TOOL_STATUS),1)
MAKEFLAGS += -q
endif
endif
endif

# `make rollout` exits with the rollout's own code the same way (1: stopped at a wave). It runs for as
# long as its waves take, so its output is not held back: it goes to standard error as it happens.
# A dry run (make -n) only prints the command.
ROLLOUT_CMD = $(PY) -m fleet $(ROOT_ARG) rollout --stack $(STACK) $(ACK_ARG) $(if $(VERIFY_PLAN),--plan $(VERIFY_PLAN)) $(if $(REACH),--reach '$(REACH)')
DRY_RUN := $(findstring n,$(firstword -$(MAKEFLAGS)))
ifeq ($(MAKECMDGOALS)$(DRY_RUN),rollout)
$(if $(PY_DEPS),$(shell $(MAKE) --no-print-directory -s venv PYTHON='$(PYTHON)' >&2))
ROLLOUT_STATUS := $(shell $(ROLLOUT_CMD) >&2; echo $$?)
ifeq ($(ROLLOUT_STATUS),1)
MAKEFLAGS += -q
endif
endif

$(STAMP): requirements.txt requirements-dev.txt
	@$(PYTHON) -c 'import sys; sys.exit(0 if (3, 11) <= sys.version_info[:2] <= (3, 13) else "dstack-fleet needs Python 3.11, 3.12 or 3.13; this is " + sys.version.split()[0] + " (set PYTHON=python3.11)")'
	@echo "creating $(VENV) with $$($(PYTHON) -c 'import sys; print(sys.executable, sys.version.split()[0])') and installing the hash-locked requirements (a minute or two on a first run) ..."
	@rm -rf $(VENV)
	@$(PYTHON) -m venv $(VENV)
	@$(PY) -m pip install --disable-pip-version-check --no-input --progress-bar off --require-hashes --no-deps \
		-r requirements.txt -r requirements-dev.txt | grep -E '^(Collecting|Successfully installed)' | sed 's/^/  /' || true
	@$(PY) -c 'import pulumi, pulumi_gcp, pytest' || { echo "the install into $(VENV) failed; run it again to see pip's errors" >&2; exit 1; }
	@touch $@
	@echo "$(VENV) is ready"

venv: $(STAMP)

help:  ## this list
	@echo "dstack-fleet: make <target> [STACK=dev] ...  (the first run creates .venv)"
	@grep -hE '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | sed -E 's/^([a-z-]+):.*## (.*)$$/\1\t\2/' | awk -F'\t' '{printf "  %-12s %s\n", $$1, $$2}'

# The suite runs on every core (pytest-xdist; a file's tests stay on one worker so its module fixtures,
# such as the policy pack's server, start once). `make test-fast`: the pure core and config tests, for
# iterating. `make test-random`: the suite in a random order (its seed printed; SEED=N repeats it).
PYTEST     = $(PY) -m pytest -n auto --dist loadfile
FAST_TESTS = $(addprefix tests/test_,$(addsuffix .py,architecture naming config identity topology initscript \
             imageref compose measure verify lock rules recipes ocilayout phala harness))

test: $(PY_DEPS)  ## the whole offline test suite on every core
	$(PYTEST) -p no:randomly $(TEST_ARGS)

test-fast: $(PY_DEPS)  ## the pure core and config tests, for iterating
	$(PYTEST) -p no:randomly $(FAST_TESTS) $(TEST_ARGS)

# The seed is chosen here and printed (pytest's header, which names it, is quiet): SEED=N repeats an order.
ifeq ($(filter test-random,$(MAKECMDGOALS)),test-random)
ifndef SEED
SEED := $(shell od -An -N4 -tu4 /dev/urandom | tr -d ' ')
endif
endif
test-random: $(PY_DEPS)  ## the whole suite in a random order; SEED=N repeats one
	@echo "random order, seed $(SEED): make test-random SEED=$(SEED) repeats it"
	$(PYTEST) -p randomly --randomly-seed=$(SEED) $(TEST_ARGS)

plan: $(PY_DEPS)  ## offline plan: STACK=dev [PASS=preview|up] [PLAN_JSON=f] [FORMAT=text|markdown] [VERBOSE=1] [DEBUG=1]
ifdef TOOL_STATUS
	@exit $(TOOL_STATUS)
else
	$(PLAN_CMD)
endif

diff: $(PY_DEPS)  ## Markdown diff of offline plans: STACK=prod BASE=origin/main
ifdef TOOL_STATUS
	@exit $(TOOL_STATUS)
else
	$(DIFF_CMD)
endif

golden: $(PY_DEPS)  ## rewrite tests/golden/ after a reviewed change
	$(PY) -m tests.regenerate golden

readme: $(PY_DEPS)  ## rewrite the generated sections of README.md and docs/*.md
	$(PY) -m tests.regenerate readme

preview: $(PY_DEPS)  ## pulumi preview with the policy pack: STACK=dev
	$(PY) -m fleet $(ROOT_ARG) deploy preview --stack $(STACK)

up: $(PY_DEPS)  ## pulumi up after the live preview passed the rollout rules: STACK=dev [ACK=...]
	$(PY) -m fleet $(ROOT_ARG) deploy up --stack $(STACK) $(ACK_ARG)

# A change in waves: a targeted up per wave, a health wait, an attestation gate (VERIFY_PLAN=f: a plan
# JSON to verify against instead of planning the checkout). Exit 0 done, 1 stopped at a failing wave.
rollout: $(PY_DEPS)  ## pulumi up in attestation-gated waves: STACK=prod [ACK=...] [VERIFY_PLAN=f] [REACH=iap|direct]
ifdef ROLLOUT_STATUS
	@exit $(ROLLOUT_STATUS)
else
	$(ROLLOUT_CMD)
endif

# Run one image build on this machine: make build-local STACK=dev IMAGE=<key> OUT=dist/
build-local: $(PY_DEPS)  ## one image build on this machine: STACK=dev IMAGE=key OUT=dist/
	$(PY) -m fleet build-local --stack $(STACK) --image $(IMAGE) --out $(OUT) $(if $(BUCKET),--bucket $(BUCKET))

bench: $(PY_DEPS)  ## plan time against the engine's floor, memory, graph depth
	$(PY) -m fleet bench

# Record the images stack's build outputs in images.lock.json (OUTPUTS=file.json works offline).
lock: $(PY_DEPS)  ## record the images stack's outputs in images.lock.json [OUTPUTS=f]
	$(PY) -m fleet $(ROOT_ARG) lock $(if $(OUTPUTS),--outputs $(OUTPUTS))

# Read the images stack's finished and failed builds from the bucket into COLLECTED (default
# collected.json), for `make lock OUTPUTS=$(COLLECTED)`; exit 1 when a build's outputs fail verification.
COLLECTED ?= collected.json
collect: $(PY_DEPS)  ## read finished image builds from the bucket [COLLECTED=f]
	$(PY) -m fleet $(ROOT_ARG) collect --stack images --out $(COLLECTED)

# Images and bucket artifacts nothing names any more: listed; with GC_APPLY=1 marked, then deleted
# once unnamed for dstack-fleet:gc.retentionDays (never an image a disk was made from).
gc: $(PY_DEPS)  ## list (GC_APPLY=1: delete) what nothing names: STACK=dev
	$(PY) -m fleet $(ROOT_ARG) gc --stack $(STACK) $(if $(GC_APPLY),--apply)

# Re-resolve and hash-lock the requirements (needs network access to PyPI).
# Compiled into copies (so the current pins are kept) and moved over a file only when its content changed:
# an unchanged file keeps its timestamp, so .venv is not rebuilt for nothing.
PIPTOOLS = $(VENV)-piptools
lock-deps:  ## re-resolve and hash-lock requirements*.txt (needs PyPI)
	@test -x $(PIPTOOLS)/bin/pip-compile || { $(PYTHON) -m venv $(PIPTOOLS) && $(PIPTOOLS)/bin/pip install --quiet pip-tools==7.6.2; }
	@set -e; for name in requirements requirements-dev; do \
		cp $$name.txt $(PIPTOOLS)/$$name.txt; \
		$(PIPTOOLS)/bin/pip-compile --quiet --generate-hashes --allow-unsafe --strip-extras \
			-o $(PIPTOOLS)/$$name.txt $$name.in; \
		sed -i "s#$(PIPTOOLS)/$$name.txt#$$name.txt#" $(PIPTOOLS)/$$name.txt; \
		if cmp -s $(PIPTOOLS)/$$name.txt $$name.txt; then echo "$$name.txt: unchanged"; \
		else mv $(PIPTOOLS)/$$name.txt $$name.txt; echo "$$name.txt: updated"; fi; \
	done

clean:  ## remove .venv
	rm -rf $(VENV) $(PIPTOOLS) .pytest_cache
