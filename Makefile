# The two commands of the README. Both are idempotent.
#   make run    set up, make the demo model, start the whole stack, send one request
#   make test   set up with test dependencies, run the test suite
VENV ?= .venv
PY := $(VENV)/bin/python
DEMO_MODEL ?= models/demo-llama
PROMPT ?= The quick brown fox

.PHONY: run test setup demo-model generate

setup:
	@bash scripts/setup.sh

demo-model: setup
	@[ -f $(DEMO_MODEL)/config.json ] || $(PY) -m tessera.cli make-model $(DEMO_MODEL) --arch llama --preset small

run: demo-model
	@bash scripts/run_demo.sh $(DEMO_MODEL) "$(PROMPT)"

generate: demo-model
	$(PY) -m tessera.cli generate --model $(DEMO_MODEL) --prompt "$(PROMPT)" --max-tokens 32

test:
	@bash scripts/setup.sh --test
	$(PY) -m pytest -q
