# One-command set-up: every target installs what it needs first (as root on Debian).
SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
APT_PACKAGES := fuse3 libfuse3-dev pkg-config curl git sqlite3 attr rsync python3-minimal glusterfs-server glusterfs-client
APT_PACKAGES += systemd  # systemd-analyze verify of the units (tests/test_systemd_units.py)
BACKING ?= data
MOUNTPOINT ?= mnt
PYTEST_ARGS ?=

.PHONY: all setup system-packages venv test mount umount clean bench bench-quick bench-deps \
	install-mount-helper uninstall-mount-helper fuzz

all: test

system-packages:
	@missing=""; for p in $(APT_PACKAGES); do \
	  dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q "ok installed" || missing="$$missing $$p"; \
	done; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" != 0 ]; then echo "missing Debian packages:$$missing (run as root, or: sudo apt-get install$$missing)"; exit 1; fi; \
	  echo "installing:$$missing"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	fi

$(VENV)/.installed: pyproject.toml
	@test -x $(PY) || python3 -m venv $(VENV)
	@# pipefail: pip's exit status is the recipe's; grep only hides pip's harmless
	@# "WARNING: Location ..." line (grep -v exits 1 when nothing is left to print).
	set -o pipefail; $(PY) -m pip install -q --disable-pip-version-check -e '.[test]' 2>&1 \
	  | { grep -v "^WARNING: Location" || true; }
	@# Every dependency of the suite, the test extras too: tests import them unconditionally.
	@$(PY) -c "import pyfuse3, trio, cryptography, h11, pytest, hypothesis, huaweicloudsdkkms, huaweicloudsdkcore"
	@touch $@

venv: $(VENV)/.installed

setup: system-packages venv

test: setup
	$(VENV)/bin/pytest $(PYTEST_ARGS)

# Coverage-guided fuzzing of the on-disk parsers (tests/fuzz/, not in CI): atheris is
# installed into the venv for this target only; it is no dependency of the project.
FUZZ_SECONDS ?= 600
fuzz: setup
	$(PY) -m pip install -q --disable-pip-version-check atheris
	@mkdir -p .fuzz-corpus
	$(PY) tests/fuzz/fuzz_encfs_parsers.py -max_total_time=$(FUZZ_SECONDS) .fuzz-corpus

# The main job: mount ./$(BACKING) (ciphertext) on ./$(MOUNTPOINT) (plaintext). A local KMS
# with the default key sfs/default is started if none answers on the default socket.
mount: setup
	@mkdir -p $(BACKING) $(MOUNTPOINT)
	$(VENV)/bin/encfs mount $(BACKING) $(MOUNTPOINT)

umount:
	$(VENV)/bin/encfs umount $(MOUNTPOINT)

# mount(8) and /etc/fstab (README, "fstab"): mount.fuse3 runs `encfs` from the standard
# PATH for a fuse.encfs line; this links this checkout's encfs there (as root).
HELPER_LINK ?= /usr/local/sbin/encfs
install-mount-helper: setup
	ln -sfn $(CURDIR)/$(VENV)/bin/encfs $(HELPER_LINK)

uninstall-mount-helper:
	@if [ "$$(readlink $(HELPER_LINK))" = "$(CURDIR)/$(VENV)/bin/encfs" ]; then rm $(HELPER_LINK); \
	else echo "$(HELPER_LINK) is not this checkout's link: left alone"; fi

clean:
	@if mountpoint -q $(MOUNTPOINT) 2>/dev/null; then echo "$(MOUNTPOINT) is mounted: make umount first"; exit 1; fi
	rm -rf $(VENV) *.egg-info .pytest_cache .hypothesis build
	find . -name __pycache__ -prune -exec rm -rf {} +

# --- benchmark (bench/bench.py, docs/PERFORMANCE.md) -------------------------------------
# Plain dir, encfs and gocryptfs side by side in one run; ratios, medians of 3, JSON in
# bench/results/. gocryptfs is optional (its column is skipped without it); fio is needed.
BENCH_APT := fio gocryptfs
BENCH_ARGS ?=

bench-deps: setup
	@for p in $(BENCH_APT); do \
	  dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q "ok installed" && continue; \
	  if [ "$$(id -u)" != 0 ]; then echo "missing Debian package $$p (run as root, or: sudo apt-get install $$p)"; \
	    if [ $$p = fio ]; then exit 1; else continue; fi; fi; \
	  echo "installing: $$p"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$p >/dev/null \
	    || { echo "could not install $$p"; [ $$p != fio ] || exit 1; }; \
	done

# Full run: about 11 minutes on 2 cores.
bench: bench-deps
	$(PY) bench/bench.py $(BENCH_ARGS)

# Short run for development (under 3 minutes).
bench-quick: bench-deps
	$(PY) bench/bench.py --quick $(BENCH_ARGS)
