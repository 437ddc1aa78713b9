#!/usr/bin/env bash
# Start PostgreSQL, MariaDB and RabbitMQ when they are not running, and wait until each
# answers (bounded). moto's SQS server is started by the test fixtures themselves.
set -u

deadline() { echo $(( $(date +%s) + $1 )); }

wait_for() {  # name, seconds, command...
  local name=$1 seconds=$2; shift 2
  local until; until=$(deadline "$seconds")
  while ! "$@" >/dev/null 2>&1; do
    if [ "$(date +%s)" -ge "$until" ]; then
      echo "services: $name did not come up within ${seconds}s" >&2
      return 1
    fi
    sleep 1
  done
  echo "services: $name is up"
}

status=0

if ! pg_isready -q -h 127.0.0.1 -p 5432 2>/dev/null; then
  echo "services: starting PostgreSQL"
  pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql | head -n1)" main start || true
fi
wait_for PostgreSQL 60 pg_isready -q -h 127.0.0.1 -p 5432 || status=1

if ! mysqladmin --protocol=tcp -h 127.0.0.1 -P 3306 -uroot ping >/dev/null 2>&1; then
  echo "services: starting MariaDB"
  start-stop-daemon --start --oknodo --background --exec /usr/sbin/mariadbd || true
fi
wait_for MariaDB 60 mysqladmin --protocol=tcp -h 127.0.0.1 -P 3306 -uroot ping || status=1
mysql --protocol=tcp -h 127.0.0.1 -uroot -e "CREATE DATABASE IF NOT EXISTS test" >/dev/null 2>&1 || true

rabbit_up() { rabbitmq-diagnostics -q check_port_connectivity; }
if ! rabbit_up >/dev/null 2>&1; then
  echo "services: starting RabbitMQ"
  rabbitmq-server -detached >/dev/null 2>&1 || true
fi
wait_for RabbitMQ 120 rabbit_up || status=1

exit $status
