# The two commands of the README:
#   make demo   set up, then run a local Ray cluster with examples/hello_ray.py
#   make test   set up (apt + pip), then run the whole test suite on the real bed
#               (and the demo from the installed wheel: make wheel-demo)
VENV ?= .venv
PY := $(VENV)/bin/python
BASE_PYTHON := $(shell command -v python3.11 || command -v python3)

.PHONY: demo wheel-demo test system-deps bench bench-scale setup docs screenshot lint server server-stop

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(BASE_PYTHON) -m venv $(VENV)
	# uv installs the dependencies in seconds (pip: minutes); pip is the fallback. Bytecode
	# compiled at install: with PYTHONDONTWRITEBYTECODE set (as on some machines) none is
	# ever written, and every Ray process of the demo starts about 3x slower
	$(PY) -m pip install --quiet --disable-pip-version-check uv
	$(VENV)/bin/uv pip install --quiet --compile-bytecode -p $(PY) -e '.[test]' \
		|| $(PY) -m pip install --quiet --disable-pip-version-check -e '.[test]'
	touch $@

demo: setup
	$(PY) -m flows.ray_cluster --user-script examples/hello_ray.py

# The demo from the installed wheel, as a user without the checkout runs it: the wheel built
# through its sdist (a build in place would reuse build/, stale files and all), installed in a
# fresh venv (its dependencies from uv's cache), run from an empty directory where
# examples/hello_ray.py is the example the package ships. Bytecode is written as modules are
# first imported (PYTHONDONTWRITEBYTECODE unset): cheaper than compiling every dependency at
# install, and the Ray processes need it (see setup).
WHEEL_VENV ?= /tmp/activate-ray-wheel-demo
wheel-demo: setup
	rm -rf $(WHEEL_VENV)
	$(VENV)/bin/uv build --quiet --out-dir $(WHEEL_VENV)/dist .
	$(VENV)/bin/uv venv --quiet --python $(PY) $(WHEEL_VENV)/venv
	$(VENV)/bin/uv pip install --quiet -p $(WHEEL_VENV)/venv/bin/python $(WHEEL_VENV)/dist/*.whl
	mkdir $(WHEEL_VENV)/cwd
	# its default Prefect server in the demo's dir, stopped after (a user's own stays up, idle-timed)
	cd $(WHEEL_VENV)/cwd && export AR_DEFAULT_SERVER_DIR=$(WHEEL_VENV)/default-server \
		&& status=0 && env -u PYTHONPATH -u PYTHONDONTWRITEBYTECODE \
		$(WHEEL_VENV)/venv/bin/python -m flows.ray_cluster --user-script examples/hello_ray.py || status=$$?; \
		$(WHEEL_VENV)/venv/bin/python -m flows.user_server stop >/dev/null; exit $$status

# a lasting Prefect server of yours (loopback, a free port, a secret), set in your Prefect profile
server: setup
	PREFECT_BIN=$(VENV)/bin/prefect bash scripts/prefect_server.sh start

server-stop: setup
	PREFECT_BIN=$(VENV)/bin/prefect bash scripts/prefect_server.sh stop

system-deps:
	bash tests/bed/install_system_deps.sh

# wheel-demo first: the local demo from the installed wheel, once (about 40 s on 2 busy cores)
test: system-deps setup lint wheel-demo
	$(PY) -m pytest

# ruff over every .py of ours, shellcheck over every .sh (sourced ones say `shell=bash`)
lint: setup
	$(VENV)/bin/ruff check .
	shellcheck -x -e SC1091 $$(git ls-files '*.sh' 2>/dev/null || find . -name '*.sh' -not -path './.venv/*')

bench: system-deps setup
	$(PY) -m bench

bench-scale: system-deps setup
	$(PY) -m bench.scale

docs: setup
	$(PY) -m flows.inputs_doc --write

screenshot: setup
	command -v chromium >/dev/null || apt-get install -y -q chromium
	$(PY) docs/screenshot_run_form.py slurm
