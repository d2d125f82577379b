# Two commands on a fresh clone: `make run` and `make test`. Each builds what it needs.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
SOURCES := $(shell find ext immucore -name '*.pyx' -o -name '*.pxd' -o -name '*.pxi' -o -name '*.py') setup.py pyproject.toml

.PHONY: run demo test test-slow bench clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip

# Reinstall (and rebuild the extension) whenever a source or build file changes.
$(STAMP): $(PY) $(SOURCES)
	$(PY) -m pip install --quiet -e '.[test]'
	touch $(STAMP)

# The node on its defaults: port 3322, data in ./data, sysadmin immudb/immudb (loopback only
# until that password is changed). Stop it with Ctrl-C.
run: $(STAMP)
	$(VENV)/bin/immucore --dir ./data $(ARGS)

# The embedded API without a server: write, prove, verify, replicate into ./demo-data.
demo: $(STAMP)
	$(VENV)/bin/immucore-demo --dir ./demo-data

# The whole default suite, with the native codec required (never green on the fallback alone).
test: $(STAMP)
	IMMUCORE_FORCE_NATIVE=1 $(PY) -m pytest -m "not slow" --benchmark-disable $(ARGS)

# Long runs: soak tests and the full-size benchmarks.
test-slow: $(STAMP)
	IMMUCORE_FORCE_NATIVE=1 $(PY) -m pytest -m slow $(ARGS)

bench: $(STAMP)
	IMMUCORE_FORCE_NATIVE=1 $(PY) -m pytest benchmarks -m "slow or not slow" --benchmark-only $(ARGS)

clean:
	rm -rf $(VENV) build *.egg-info ext/immucore/*.c ext/immucore/*.html immucore/*.so
