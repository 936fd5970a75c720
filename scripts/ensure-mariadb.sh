#!/usr/bin/env bash
# Make sure a MariaDB server answers on 127.0.0.1:3306 (the DIRAC tests' database) and that the admin
# login the DIRAC bring-up uses works over TCP: user airlock_admin, no password, loopback only, all
# privileges. It is created through the root login (TCP without a password, as these machines come,
# or Debian's default unix-socket login as root).
set -euo pipefail
ADMIN=${AIRLOCK_DIRAC_MYSQL_ADMIN_USER:-airlock_admin}
up() { mariadb-admin -h 127.0.0.1 -P 3306 -u root --connect-timeout=2 ping >/dev/null 2>&1 \
       || mariadb-admin -h 127.0.0.1 -P 3306 -u "$ADMIN" --connect-timeout=2 ping >/dev/null 2>&1 \
       || mariadb-admin --connect-timeout=2 ping >/dev/null 2>&1; }
if ! up; then
  mkdir -p /run/mysqld && chown mysql:mysql /run/mysqld 2>/dev/null || true
  start-stop-daemon --start --oknodo --background --exec /usr/sbin/mariadbd -- --user=mysql
  for _ in $(seq 30); do up && break; sleep 1; done
  up || { echo "MariaDB did not come up on 127.0.0.1:3306" >&2; exit 1; }
fi
if mariadb -h 127.0.0.1 -P 3306 -u "$ADMIN" -e "SELECT 1" >/dev/null 2>&1; then exit 0; fi
sql="CREATE USER IF NOT EXISTS '$ADMIN'@'127.0.0.1'; CREATE USER IF NOT EXISTS '$ADMIN'@'localhost';
GRANT ALL PRIVILEGES ON *.* TO '$ADMIN'@'127.0.0.1' WITH GRANT OPTION;
GRANT ALL PRIVILEGES ON *.* TO '$ADMIN'@'localhost' WITH GRANT OPTION; FLUSH PRIVILEGES;"
mariadb -h 127.0.0.1 -P 3306 -u root -e "$sql" 2>/dev/null || mariadb -u root -e "$sql"
mariadb -h 127.0.0.1 -P 3306 -u "$ADMIN" -e "SELECT 1" >/dev/null
