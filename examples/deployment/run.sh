#!/usr/bin/env bash
# Run the Flower App on a local deployment (see README.md); arguments go to run.py.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
exec "${PYTHON:-$here/../../.venv/bin/python}" "$here/run.py" "$@"
