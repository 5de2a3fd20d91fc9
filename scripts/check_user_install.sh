#!/usr/bin/env bash
# The user's path, as the README's Install section gives it: a clean venv with only
# `pip install .` (no extras, no test tools), then the CLI, an import of every public module
# and a short run of the main recipe (2 tasks, 1 epoch) to its end, plots included. It runs
# outside the repository's tree of sources, so that only the installed package is importable.
# pip's cache is kept, so a second run installs from it.
#
# Disk: an empty install takes a CUDA build of torch (about 5.5 GB), and a CI machine does not
# always have room for it beside .venv (an earlier CI run ran out of space here). So pip first
# plans the empty install (`--dry-run --report`, nothing unpacked), scripts/seed_venv.py links
# every planned distribution that .venv holds at the planned version into the new venv (hard
# links: no disk), and then `pip install .` runs as the user's would, installing the rest.
# SEED=0 skips the seeding, for a fully independent install where the disk allows.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
PYTHON=${PYTHON:-python3}
SEED=${SEED:-1}
# Beside .venv (same file system, so hard links work), ignored by git.
work=$(mktemp -d "$repo/.user-install.XXXXXX")
trap 'rm -rf "$work"' EXIT
venv="$work/venv"
log="$work/install.log"

# Install from a copy of the files git tracks or would track: `pip install .` builds inside
# the tree, and a stale build/ there could ship modules that no longer exist.
src="$work/src"
mkdir -p "$src"
(cd "$repo" && git ls-files -co --exclude-standard -z \
  | tar --null --ignore-failed-read -T - -cf -) | tar -xf - -C "$src"

echo "user install: pip install . into an empty venv ..."
"$PYTHON" -m venv "$venv"
{
  "$venv/bin/python" -m pip install --upgrade pip
  if [ "$SEED" = 1 ] && [ -x "$repo/.venv/bin/python" ]; then
    "$venv/bin/python" -m pip install --dry-run --quiet --report "$work/plan.json" "$src"
    "$repo/.venv/bin/python" "$repo/scripts/seed_venv.py" "$work/plan.json" "$venv" halrp-adapt
  fi
  "$venv/bin/python" -m pip install "$src"
  "$venv/bin/python" -m pip check
} >"$log" 2>&1 || { tail -n 30 "$log"; echo "user install: pip install . failed" >&2; exit 1; }
grep "user install: seeded" "$log" || true

cd "$work"
"$venv/bin/halrp-adapt" --help >/dev/null
"$venv/bin/python" - <<'EOF'
import importlib
import pkgutil

import halrp_adapt

names = ["halrp_adapt"] + [m.name for m in pkgutil.walk_packages(halrp_adapt.__path__,
                                                                 "halrp_adapt.")]
for name in names:
    importlib.import_module(name)
print(f"user install: imported {len(names)} modules")
EOF

run="$work/run"
HF_HUB_OFFLINE=1 "$venv/bin/accelerate" launch \
  "$src/recipes/vit_split_imagenet.py" --num-tasks 2 --epochs 1 --no-progress \
  --output-dir "$run" >"$work/run.log" 2>&1 \
  || { tail -n 40 "$work/run.log"; echo "user install: the recipe failed" >&2; exit 1; }
for f in metrics.json accuracy_matrix.csv accuracy_matrix.png ranks.png growth.png \
         adapters/halrp_index.json; do
  [ -s "$run/$f" ] || { tail -n 40 "$work/run.log"; echo "user install: $f missing" >&2; exit 1; }
done
grep -E "^ACC " "$work/run.log" || true
echo "user install: OK (CLI, imports, 2-task recipe with plots)"
