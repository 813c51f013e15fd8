# README's two commands: `make demo` and `make test`. Both build .venv first.
VENV ?= .venv
PY := $(VENV)/bin/python
# The CPU build of torch that lies on disk here; on another machine set TORCH_SPEC="torch" (or a CUDA build).
TORCH_SPEC ?= torch==2.13.0
DEMO_DIR ?= outputs/qlora_sft
export TOKENIZERS_PARALLELISM := false
export PYTHONUNBUFFERED := 1

.PHONY: setup demo test notebooks clean

setup: $(VENV)/.installed

$(VENV)/.installed: requirements.txt pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -r requirements.txt -e .
	touch $@

demo: setup
	mkdir -p $(DEMO_DIR)
	$(VENV)/bin/papermill notebooks/qlora_sft.ipynb $(DEMO_DIR)/qlora_sft.ipynb --kernel python3 \
		-p preset tiny -p install False -p output_dir $(abspath $(DEMO_DIR))
	$(PY) -m nbhelpers.summary $(DEMO_DIR)

test: setup
	$(VENV)/bin/pytest -q

notebooks: setup
	$(PY) notebooks/build.py

clean:
	rm -rf outputs .pytest_cache
