#!/usr/bin/env bash
# Command 1: install everything (first time only) and open the dashboard on localhost.
set -euo pipefail
cd "$(dirname "$0")"
bash scripts/setup.sh main
exec .venv/bin/autodiff dashboard "$@"
