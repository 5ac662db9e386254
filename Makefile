# The two quick-start commands (see README.md): `make train` and `make test`.
PY := .venv/bin/python
# `make train OUT=dir` moves the run; an OUT in the environment does not
OUT := runs/quickstart

.PHONY: setup train test bench lint

setup:
	bash scripts/setup.sh

train: setup
	$(PY) -m fastchar.train --impl fused --out "$(OUT)"
	$(PY) -m fastchar.sample --ckpt "$(OUT)/ckpt.pt" --prime "def " --length 400 --seed 0

test: setup
	bash scripts/test.sh

bench: setup
	$(PY) benchmarks/run.py --device cpu

lint: setup
	$(PY) -m ruff check fastchar tests benchmarks
