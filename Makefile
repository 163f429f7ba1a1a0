# One-command entry points; see README.md. Everything installs into .venv here.
PYTHON ?= python3
VENV   ?= .venv
BIN     = $(VENV)/bin
STAMP   = $(VENV)/.installed

.PHONY: install run test bench clean deb deb-deps deb-test

install: $(STAMP)

$(STAMP): setup.py pyproject.toml $(wildcard native/*.c native/*.h) native/build_native.py
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	touch $@

# Start the broker unless it runs; either way say where it is and how to reach it.
run: install
	@$(BIN)/ave-config --create-default
	@if $(BIN)/ave-broker --status >/dev/null 2>&1; then $(BIN)/ave-broker --status; \
	else $(BIN)/ave-broker --start; fi
	@echo 'The tools are in $(BIN): try $(BIN)/ave list --all, or first . $(BIN)/activate'

test: install
	$(BIN)/mypy
	$(BIN)/python -m pytest

# Every benchmark an issue names, one target each, in this order: `make -k bench` runs
# them all even when one misses its target (restart.py then exits 1). QUICK=1 gives
# each the short run it has (cmd.py and sandbox.py have one length, about half a
# minute). Baselines come from bench/requirements.txt; lab.py and etcd_ops.py start
# their own etcd (Debian's etcd-server), sandbox.py compares against bwrap.
BENCHES = rpc cmd broker waiting wakeup lab statuspage restart restart-crash sandbox \
          etcd_ops http_feed
QUICK_FLAG = $(if $(QUICK),--quick)
.PHONY: bench-deps $(addprefix bench-,$(BENCHES))

bench: $(addprefix bench-,$(BENCHES))

bench-deps: install
	$(BIN)/pip install --quiet -r bench/requirements.txt

bench-rpc: bench-deps
	$(BIN)/python bench/rpc.py $(QUICK_FLAG)
bench-cmd: bench-deps
	$(BIN)/python bench/cmd.py
bench-broker: bench-deps
	$(BIN)/python bench/broker.py $(QUICK_FLAG)
bench-waiting: bench-deps
	$(BIN)/python bench/waiting.py $(QUICK_FLAG)
bench-wakeup: bench-deps
	$(BIN)/python bench/wakeup.py $(QUICK_FLAG)
bench-lab: bench-deps
	$(BIN)/python bench/lab.py $(QUICK_FLAG)
bench-statuspage: bench-deps
	$(BIN)/python bench/statuspage.py $(QUICK_FLAG)
bench-restart: bench-deps
	$(BIN)/python bench/restart.py $(QUICK_FLAG)
bench-restart-crash: bench-deps
	$(BIN)/python bench/restart.py --crash $(QUICK_FLAG)
bench-sandbox: bench-deps
	$(BIN)/python bench/sandbox.py
bench-etcd_ops: bench-deps
	$(BIN)/python bench/etcd_ops.py $(QUICK_FLAG)
bench-http_feed: bench-deps
	$(BIN)/python bench/http_feed.py $(QUICK_FLAG)

# The Debian package, built from a copy of the tree's files (tracked and not ignored)
# so that the build leaves nothing in the tree; the .deb lands in $(DEB_DIR).
# `make deb-deps` (root) installs what the build and deb-test need.
DEB_DIR = build/deb

deb-deps:
	apt-get update -qq
	DEBIAN_FRONTEND=noninteractive apt-get build-dep -y -qq ./
	DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
		lintian debootstrap iproute2

deb:
	rm -rf $(DEB_DIR)
	mkdir -p $(DEB_DIR)/ave
	git ls-files -z --cached --others --exclude-standard \
		| tar -c --null --files-from=- --ignore-failed-read | tar -x -C $(DEB_DIR)/ave
	cd $(DEB_DIR)/ave && dpkg-buildpackage -us -uc -b
	rm -rf $(DEB_DIR)/ave

# Lintian, then install, upgrade and purge the package in a debootstrap root
# (root only; tests/packaging/test_deb.py skips without AVE_PACKAGE_TEST=1).
deb-test: deb install
	lintian --fail-on error $(DEB_DIR)/ave_*.deb
	AVE_PACKAGE_TEST=1 $(BIN)/python -m pytest tests/packaging

clean:
	rm -rf $(VENV) build *.egg-info ave/_native*.so
