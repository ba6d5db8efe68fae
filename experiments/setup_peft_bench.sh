#!/usr/bin/env bash
# Create the virtual environment with PyTorch (CPU) and PEFT 0.12 that experiments/bench_peft_loftq.py runs
# PEFT's LoftQ in. Usage: bash experiments/setup_peft_bench.sh [VENV_DIR]  (default: .bench-venv in the repo root)
set -euo pipefail

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv_dir="${1:-$repo_root/.bench-venv}"

python3 -m venv "$venv_dir"
"$venv_dir/bin/python" -m pip install --quiet --upgrade pip
"$venv_dir/bin/python" -m pip install -r "$repo_root/experiments/requirements-peft-bench.txt"

# Fail here, not in the benchmark, if the pins do not import together.
"$venv_dir/bin/python" -c "import torch, peft, transformers; print('torch', torch.__version__, 'peft', peft.__version__, 'transformers', transformers.__version__)"
du -sh "$venv_dir"
