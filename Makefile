# dstack-fleet entry points. Everything runs from a fresh clone with only Python 3.11 and PyPI:
# the first target that needs Python creates .venv and installs the hash-locked requirements.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-$(shell cat requirements.txt requirements-dev.txt | cksum | cut -d' ' -f1)

# Targets that run Python depend on this; tests that call make from inside the suite set it empty.
PY_DEPS ?= $(STAMP)

STACK  ?= dev
FORMAT ?= text
PLAN_JSON ?=
BASE   ?= HEAD

.PHONY: venv test plan golden readme preview up lock collect gc lock-deps diff bench clean

# FLEET_ROOT plans another checkout's stacks with this code (tests use it on temporary copies).
ROOT_ARG = $(if $(FLEET_ROOT),--root $(FLEET_ROOT))
PLAN_CMD = $(PY) -m fleet $(ROOT_ARG) plan --stack $(STACK) --format $(FORMAT) $(if $(PLAN_JSON),--json $(PLAN_JSON))
DIFF_CMD = $(PY) -m fleet $(ROOT_ARG) diff --stack $(STACK) --base $(BASE) $(if $(DIFF_MD),--output $(DIFF_MD))

# `make plan` and `make diff` must exit with the tool's own code: 0 ok, 1 a mandatory check failed,
# 2 bad input. GNU make reports every failing recipe as 2 and exits 1 only in question mode (-q), so
# when one of them is the only goal the tool runs while the Makefile is read, its output is printed,
# and code 1 is passed on through question mode; other codes fail the recipe below.
TOOL_GOAL := $(filter plan diff,$(MAKECMDGOALS))
ifneq ($(TOOL_GOAL),)
ifeq ($(words $(MAKECMDGOALS)),1)
$(if $(PY_DEPS),$(shell $(MAKE) --no-print-directory -s venv >&2))
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

$(STAMP): requirements.txt requirements-dev.txt
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info[:2] == (3, 11) else "dstack-fleet needs Python 3.11 (set PYTHON=python3.11)")'
	rm -rf $(VENV)
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check --require-hashes --no-deps \
		-r requirements.txt -r requirements-dev.txt
	touch $@

venv: $(STAMP)

test: $(PY_DEPS)
	$(PY) -m pytest

plan: $(PY_DEPS)
ifdef TOOL_STATUS
	@exit $(TOOL_STATUS)
else
	$(PLAN_CMD)
endif

diff: $(PY_DEPS)
ifdef TOOL_STATUS
	@exit $(TOOL_STATUS)
else
	$(DIFF_CMD)
endif

golden: $(PY_DEPS)
	$(PY) -m tests.regenerate golden

readme: $(PY_DEPS)
	$(PY) -m tests.regenerate readme

preview: $(PY_DEPS)
	$(PY) -m fleet $(ROOT_ARG) deploy preview --stack $(STACK)

up: $(PY_DEPS)
	$(PY) -m fleet $(ROOT_ARG) deploy up --stack $(STACK)

# Run one image build on this machine: make build-local STACK=dev IMAGE=<key> OUT=dist/
build-local: $(PY_DEPS)
	$(PY) -m fleet build-local --stack $(STACK) --image $(IMAGE) --out $(OUT) $(if $(BUCKET),--bucket $(BUCKET))

bench: $(PY_DEPS)
	$(PY) -m fleet bench

# Record the images stack's build outputs in images.lock.json (OUTPUTS=file.json works offline).
lock: $(PY_DEPS)
	$(PY) -m fleet $(ROOT_ARG) lock $(if $(OUTPUTS),--outputs $(OUTPUTS))

# Read the images stack's finished and failed builds from the bucket into COLLECTED (default
# collected.json), for `make lock OUTPUTS=$(COLLECTED)`; exit 1 when a build's outputs fail verification.
COLLECTED ?= collected.json
collect: $(PY_DEPS)
	$(PY) -m fleet $(ROOT_ARG) collect --stack images --out $(COLLECTED)

# Images and bucket artifacts nothing names any more: listed; with GC_APPLY=1 marked, then deleted
# once unnamed for dstack-fleet:gc.retentionDays (never an image a disk was made from).
gc: $(PY_DEPS)
	$(PY) -m fleet $(ROOT_ARG) gc --stack $(STACK) $(if $(GC_APPLY),--apply)

# Re-resolve and hash-lock the requirements (needs network access to PyPI).
lock-deps:
	$(PYTHON) -m venv /tmp/dstack-fleet-piptools && /tmp/dstack-fleet-piptools/bin/pip install --quiet pip-tools==7.6.2
	/tmp/dstack-fleet-piptools/bin/pip-compile --quiet --generate-hashes --allow-unsafe --strip-extras -o requirements.txt requirements.in
	/tmp/dstack-fleet-piptools/bin/pip-compile --quiet --generate-hashes --allow-unsafe --strip-extras -o requirements-dev.txt requirements-dev.in

clean:
	rm -rf $(VENV) .pytest_cache
