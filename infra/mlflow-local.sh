#!/usr/bin/env bash
# A team-style MLflow on one machine: PostgreSQL as the backend store and the artifacts proxied by the
# server (--serve-artifacts) into a folder, all on 127.0.0.1. The Kubernetes version is infra/mlflow.yaml.
#
#   infra/mlflow-local.sh DIR [PORT] [PGPORT]     # default ports 5000 and 5432; Ctrl-C stops both
#   python pipelines/full.py --set mlflow.tracking_uri=http://127.0.0.1:5000   # or SEEDVL_TRACKING_URI
#
# DIR keeps the database cluster (DIR/postgres) and the artifacts (DIR/artifacts) between starts. Needs
# Debian's postgresql package (apt-get install postgresql) and the venv's mlflow and psycopg2-binary
# (make setup installs them). The database trusts connections from 127.0.0.1 only: for one machine,
# never expose it. Run as root, PostgreSQL runs as the `postgres` user the package created.
set -euo pipefail

dir=${1:?usage: infra/mlflow-local.sh DIR [PORT] [PGPORT]}
port=${2:-5000}
pgport=${3:-5432}
mkdir -p "$dir"
dir=$(cd "$dir" && pwd)
mlflow=${MLFLOW:-$(dirname "${BASH_SOURCE[0]}")/../.venv/bin/mlflow}
[ -x "$mlflow" ] || mlflow=$(command -v mlflow) || { echo "mlflow not found: run make setup" >&2; exit 1; }

pgbin=$(dirname "$(readlink -f "$(command -v initdb 2>/dev/null || ls /usr/lib/postgresql/*/bin/initdb 2>/dev/null | tail -1)")")
if [ ! -x "$pgbin/initdb" ]; then
    echo "PostgreSQL not found: apt-get install postgresql (Debian's package; .ci/run installs it)" >&2
    exit 1
fi
as_pg=()
if [ "$(id -u)" = 0 ]; then  # PostgreSQL refuses to run as root
    as_pg=(runuser -u postgres --)
    if ! runuser -u postgres -- test -x "$dir"; then
        echo "user postgres cannot enter $dir: give it a folder every user can traverse (chmod o+x its parents)" >&2
        exit 1
    fi
fi
data=$dir/postgres
if [ ! -f "$data/PG_VERSION" ]; then
    mkdir -p "$data"
    [ ${#as_pg[@]} = 0 ] || chown postgres "$data"
    "${as_pg[@]}" "$pgbin/initdb" --pgdata="$data" --username=postgres --auth=trust --encoding=UTF8 >/dev/null
fi
mkdir -p "$dir/artifacts"
"${as_pg[@]}" "$pgbin/pg_ctl" --pgdata="$data" --log="$data/server.log" --wait \
    -o "-c listen_addresses=127.0.0.1 -p $pgport -k $data" start >/dev/null
trap '"${as_pg[@]}" "$pgbin/pg_ctl" --pgdata="$data" --mode=fast --wait stop >/dev/null' EXIT
if ! "${as_pg[@]}" "$pgbin/psql" -h 127.0.0.1 -p "$pgport" -U postgres -tAc "SELECT 1 FROM pg_database WHERE datname='mlflow'" | grep -q 1; then
    "${as_pg[@]}" "$pgbin/createdb" -h 127.0.0.1 -p "$pgport" -U postgres mlflow
fi

echo "MLflow on http://127.0.0.1:$port (PostgreSQL on 127.0.0.1:$pgport, artifacts in $dir/artifacts)"
MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false "$mlflow" server \
    --backend-store-uri "postgresql+psycopg2://postgres@127.0.0.1:$pgport/mlflow" \
    --serve-artifacts --artifacts-destination "$dir/artifacts" \
    --host 127.0.0.1 --port "$port" --workers 1 &
server=$!
trap 'kill -TERM $server 2>/dev/null; wait $server; "${as_pg[@]}" "$pgbin/pg_ctl" --pgdata="$data" --mode=fast --wait stop >/dev/null' EXIT
trap 'exit 0' INT TERM
wait $server
