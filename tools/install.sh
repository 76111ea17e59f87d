#!/usr/bin/env bash
# Install mmrlhf and its tested dependency set into ./.venv.
#   bash tools/install.sh        the package and everything it runs with
#   bash tools/install.sh dev    plus the development tools (nbdev 2, trl, pytest, nbconvert)
# Every pip call goes through constraints.txt: the exact versions CI tests. (Unconstrained, open_clip_torch
# can replace torch with a different build.) Set PYTHON to choose the interpreter (3.11 or newer).
set -euo pipefail
cd "$(dirname "$0")/.."
extra=""; [ "${1:-}" = "dev" ] && extra="[dev]"
py=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$py" -m venv .venv
pip=(.venv/bin/python -m pip install -q -c constraints.txt)
"${pip[@]}" --upgrade pip setuptools wheel
"${pip[@]}" torch torchvision ninja              # first: DeepSpeed builds against the installed torch
"${pip[@]}" --no-build-isolation deepspeed
"${pip[@]}" --no-build-isolation -e ".$extra"
.venv/bin/python -c "import mmrlhf; print('mmrlhf', mmrlhf.__version__, 'installed in .venv')"
