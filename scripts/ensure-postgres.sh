#!/usr/bin/env bash
# Make sure a PostgreSQL server answers on 127.0.0.1:5432 with trust auth for local connections.
set -euo pipefail
if pg_isready -q -h 127.0.0.1 -p 5432 2>/dev/null; then exit 0; fi
ver=$(ls /etc/postgresql 2>/dev/null | sort -V | tail -n1 || true)
if [ -z "$ver" ]; then echo "postgresql is not installed" >&2; exit 1; fi
if ! pg_lsclusters -h 2>/dev/null | grep -q "^$ver main"; then
  pg_createcluster "$ver" main >/dev/null
fi
hba=/etc/postgresql/$ver/main/pg_hba.conf
if ! grep -q "airlock-trust" "$hba"; then
  printf '# airlock-trust: the test suite connects without a password on loopback\nhost all all 127.0.0.1/32 trust\nhost all all ::1/128 trust\nlocal all all trust\n' | cat - "$hba" > "$hba.new" && mv "$hba.new" "$hba"
fi
pg_ctlcluster --skip-systemctl-redirect "$ver" main start
for _ in $(seq 30); do pg_isready -q -h 127.0.0.1 -p 5432 && exit 0; sleep 1; done
echo "PostgreSQL did not come up on 127.0.0.1:5432" >&2; exit 1
