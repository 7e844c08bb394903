# The two commands of the quick start:
#   make train   set up .venv if missing, prepare the built-in corpus, pretrain on all local devices, sample
#   make test    set up .venv if missing, run the test suite
# Anything after ARGS= is passed to the trainer as Hydra overrides, e.g. make train ARGS="train.max_steps=50".

PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
TORCH  ?= torch==2.13.0

.PHONY: train test test-slow install lint clean

$(BIN)/llmtrain: setup.py
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch first and pinned: an unpinned install lets pip pick a multi-GB build we may not want.
	$(BIN)/pip install -q "$(TORCH)"
	$(BIN)/pip install -q -e ".[dev]"
	touch $@

install: $(BIN)/llmtrain

train: install
	PATH="$(abspath $(BIN)):$$PATH" bash launch/quickstart.sh $(ARGS)

test: install
	$(BIN)/python -m pytest -q tests

test-slow: install
	$(BIN)/python -m pytest -q tests -m slow

lint: install
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

clean:
	rm -rf runs/quickstart
