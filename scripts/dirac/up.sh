#!/usr/bin/env bash
# Bring up a local DIRAC 9.1.22 server (WMS, sandbox store, RSS, file catalog, storage element) in DIR.
#   scripts/dirac/up.sh DIR        # idempotent: reuses DIR/venv and the certificates, re-creates the
#                                  # databases and restarts the services; writes DIR/env.sh
# Environment: AIRLOCK_DIRAC_PORT_BASE (29140), AIRLOCK_DIRAC_DB_PREFIX (airlock_dirac_),
#   AIRLOCK_DIRAC_MYSQL_HOST/PORT/ADMIN_USER/ADMIN_PASSWORD (127.0.0.1/3306/root/""),
#   AIRLOCK_DIRAC_WHEELS (wheel cache, ~/.cache/airlock-dirac/wheels), AIRLOCK_DIRAC_LIFETIME (s, 21600).
# Stop with scripts/dirac/down.sh DIR. The setup script itself is stdlib-only (system python3).
set -euo pipefail
if [ $# -ne 1 ]; then
  echo "usage: $0 DIR" >&2
  exit 2
fi
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
exec "${PYTHON:-python3}" "$here/setup_dirac.py" up "$1"
