#!/usr/bin/env bash
# The whole test suite: export in sync, notebooks clean, every notebook's tests, pytest, the built wheel.
# Run after `bash tools/install.sh dev`. Nothing in the working tree is modified.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$PWD/.venv/bin:$PATH"
root=$PWD
scratch=$(mktemp -d); trap 'rm -rf "$scratch"' EXIT
t0=$SECONDS

echo "== 1. exported modules match the notebooks (nbdev_export on a copy)"
mkdir -p "$scratch/copy" && (git ls-files -z --cached --others --exclude-standard | tar --null -T - -cf - | tar -xf - -C "$scratch/copy")
(cd "$scratch/copy" && nbdev_export)
diff -ru mmrlhf "$scratch/copy/mmrlhf" -x __pycache__ || { echo "FAIL: run nbdev_export and commit the result"; exit 1; }

echo "== 2. notebooks are clean (nbdev_clean on a copy)"
(cd "$scratch/copy" && nbdev_clean)
diff -ru nbs "$scratch/copy/nbs" -x .ipynb_checkpoints || { echo "FAIL: run nbdev_clean and commit the result"; exit 1; }

echo "== 2b. README.md matches nbs/index.ipynb"
jupyter nbconvert --log-level ERROR --to markdown nbs/index.ipynb --output-dir "$scratch" --output README
diff -u README.md "$scratch/README.md" || { echo "FAIL: run tools/docs.sh and commit README.md"; exit 1; }

echo "== 3. every notebook's cells (nbdev_test; cells flagged slow or cuda are skipped)"
nbdev_test --n_workers 2 --timing

echo "== 4. pytest"
python -m pytest -q --durations=20 tests   # the slowest twenty are listed

echo "== 5. the built wheel imports and runs outside the checkout"
pip wheel -q --no-deps --no-build-isolation -w "$scratch/wheel" . >/dev/null
pip install -q --no-deps --no-compile --target "$scratch/site" "$scratch"/wheel/mmrlhf-*.whl
(cd "$scratch" && PYTHONPATH="$scratch/site" python -c "
import mmrlhf, mmrlhf.cli, pathlib
assert pathlib.Path(mmrlhf.__file__).is_relative_to('$scratch/site'), mmrlhf.__file__
print('wheel import ok:', mmrlhf.__file__)")

echo "== 6. the docs site builds offline: every page, every internal link, screenshots in headless Chromium"
python tools/site.py --check

echo "== all checks passed in $((SECONDS - t0)) s"
