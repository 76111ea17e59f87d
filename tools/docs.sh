#!/usr/bin/env bash
# README.md from nbs/index.ipynb, and an offline HTML page per notebook in _docs/ (no Quarto needed).
# With Quarto installed, `nbdev_docs` builds the full site from _quarto.yml instead.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$PWD/.venv/bin:$PATH"
jupyter nbconvert --log-level WARN --to markdown nbs/index.ipynb --output-dir . --output README
mkdir -p _docs
jupyter nbconvert --log-level WARN --to html --output-dir _docs nbs/index.ipynb nbs/[0-9]*.ipynb
if [ -d nbs/images ]; then cp -r nbs/images _docs/; fi   # figures the notebooks show
echo "README.md and _docs/*.html written"
