#!/usr/bin/env bash
# The one install step of the project: `make setup` (so CI) and every image in infra/ run it.
#
#   infra/install.sh PYTHON [EXTRAS] [--deps-only]
#
# 1. the dependencies in pyproject.toml (and those of EXTRAS, e.g. "test"), pinned by constraints.txt
#    (torch==2.13.0: the CPU build where pip finds it first, the CUDA build from PyPI elsewhere);
# 2. the project itself, editable, without touching its dependencies again.
# --deps-only stops after 1, so an image caches the dependency layer apart from the source.
set -euo pipefail

python=${1:?usage: infra/install.sh PYTHON [EXTRAS] [--deps-only]}
extras=${2:-}
deps_only=${3:-}
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$repo"

# The requirement strings (markers included) of [project] dependencies and the chosen extras.
listed=$("$python" - "$extras" <<'PY'
import sys
try:
    import tomllib
except ImportError:  # Python 3.10
    from pip._vendor import tomli as tomllib
project = tomllib.load(open("pyproject.toml", "rb"))["project"]
wanted = [name for name in sys.argv[1].split(",") if name]
unknown = sorted(set(wanted) - set(project.get("optional-dependencies", {})))
if unknown:
    sys.exit(f"infra/install.sh: no extras {unknown} in pyproject.toml; choose from "
             f"{sorted(project.get('optional-dependencies', {}))}")
for requirement in project["dependencies"] + [r for name in wanted for r in project["optional-dependencies"][name]]:
    print(requirement)
PY
)
mapfile -t requirements <<<"$listed"
"$python" -m pip install --quiet --disable-pip-version-check -c constraints.txt "${requirements[@]}"
if [ "$deps_only" = "--deps-only" ]; then
    exit 0
fi
"$python" -m pip install --quiet --disable-pip-version-check --no-deps -e .
