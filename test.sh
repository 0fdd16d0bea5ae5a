#!/usr/bin/env bash
# Command 2: install everything the tests need (first time only) and run the test suite.
set -euo pipefail
cd "$(dirname "$0")"
bash scripts/setup.sh dev
if [ ! -x /usr/bin/chromium ]; then
  if [ "$(id -u)" = 0 ]; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null
  else
    echo "Browser tests need Debian's chromium: sudo apt-get install chromium chromium-driver" >&2
  fi
fi
# The store's tests run on PostgreSQL too: conftest starts a server with scripts/postgres.sh
# unless AUTODIFF_TEST_POSTGRES names one (as .ci/run does); here it is installed when we can.
if ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 && ! command -v initdb >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ]; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null
  else
    echo "PostgreSQL store tests need Debian's postgresql: sudo apt-get install postgresql" >&2
  fi
fi
exec .venv/bin/python -m pytest "$@"
