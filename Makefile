# celery-fleet: `make lab` builds the local lab and deploys the fleet into it;
# `make test` runs lint, unit tests and the Molecule scenarios.
SHELL := /bin/bash
.DEFAULT_GOAL := help

VENV := .venv
PYTHON ?= python3
BIN := $(CURDIR)/$(VENV)/bin
export PATH := $(BIN):$(PATH)
export ANSIBLE_CONFIG := $(CURDIR)/ansible.cfg
export ANSIBLE_FORCE_COLOR ?= false
export PY_COLORS ?= 0
# Keep Molecule's and Ansible's scratch state inside the checkout.
export ANSIBLE_HOME := $(CURDIR)/.cache/ansible
export ANSIBLE_LOCAL_TEMP := $(CURDIR)/.cache/ansible/tmp

LAB := -i inventories/lab
SCENARIOS ?= default alternative cluster semantik

.PHONY: help venv prereqs image lab lab-open lab-down lint unit molecule test clean

help:
	@echo "make lab       build the lab hosts, deploy the fleet, run demo tasks, print status"
	@echo "make lab-open  reach the lab's Flower and Prometheus from here (127.0.0.1:5555 and :9090)"
	@echo "make lab-down  remove every lab container and network"
	@echo "make test      lint, unit tests and the Molecule scenarios ($(SCENARIOS))"

$(VENV)/.stamp: requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check -r requirements.txt
	touch $@

venv: $(VENV)/.stamp

prereqs:
	scripts/host-prereqs.sh

image: prereqs
	scripts/base-image.sh

lab: venv image
	@start=$$(date +%s); \
	ansible-playbook $(LAB) scripts/lab-hosts.yml && \
	ansible-playbook $(LAB) molecule/shared/prepare.yml && \
	ansible-playbook $(LAB) site.yml && \
	ansible-playbook $(LAB) scripts/lab-demo.yml && \
	ansible-playbook $(LAB) playbooks/status.yml && \
	echo "make lab took $$(( $$(date +%s) - start )) s" && \
	echo "Flower and Prometheus listen on lab-broker's loopback. From this machine: make lab-open, then" && \
	echo "open http://127.0.0.1:5555/workers and http://127.0.0.1:9090/classic/alerts"

# The lab has no SSH: docker exec carries each connection (ssh -L on a real fleet).
lab-open:
	scripts/lab_forward.py lab-broker 5555 9090

lab-down: venv
	ansible-playbook $(LAB) scripts/lab-hosts.yml -e lab_state=absent

lint: venv
	yamllint --strict .
	ansible-lint
	ruff check .
	ruff format --check .

unit: venv prereqs
	pytest tests

molecule: venv image
	@for s in $(SCENARIOS); do molecule test -s $$s || exit 1; done

test: lint unit molecule

clean: lab-down
	rm -rf .cache
