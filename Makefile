# The two commands of the README. Both are idempotent.
#   make run    set up, make the tiny demo model, generate from a prompt
#   make test   set up with test dependencies, run the test suite
VENV ?= .venv
PY := $(VENV)/bin/python
DEMO_MODEL ?= models/demo-llama
PROMPT ?= The quick brown fox

.PHONY: run test setup demo-model

setup:
	@bash scripts/setup.sh

demo-model: setup
	@[ -f $(DEMO_MODEL)/config.json ] || $(PY) -m tessera.cli make-model $(DEMO_MODEL) --arch llama --preset small

run: demo-model
	$(PY) -m tessera.cli generate --model $(DEMO_MODEL) --prompt "$(PROMPT)" --max-tokens 32

test:
	@bash scripts/setup.sh --test
	$(PY) -m pytest -q
