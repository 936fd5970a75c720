#!/usr/bin/env bash
# Stop the DIRAC services that scripts/dirac/up.sh DIR started (and nothing else).
set -euo pipefail
if [ $# -ne 1 ]; then
  echo "usage: $0 DIR" >&2
  exit 2
fi
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
exec "${PYTHON:-python3}" "$here/setup_dirac.py" down "$1"
