#!/bin/bash
# First start of the PostgreSQL container (docker-entrypoint-initdb.d, empty data volume only):
# one login role per server and its databases.
#   mlflow       role mlflow  - MLflow tracking server: runs, metrics, model registry
#   mlflow_auth  role mlflow  - MLflow basic-auth users and permissions
#   prefect      role prefect - Prefect server state
# Passwords come from the container's environment (infra/.env) and reach SQL as psql variables
# (:'name' quotes them), so any character is safe. Other roles cannot connect to these
# databases. Changing a password later: ALTER ROLE ... PASSWORD, and the value in infra/.env.
set -eo pipefail

: "${MLFLOW_DB_PASSWORD:?MLFLOW_DB_PASSWORD is not set}"
: "${PREFECT_DB_PASSWORD:?PREFECT_DB_PASSWORD is not set}"

psql --no-psqlrc -v ON_ERROR_STOP=1 --username "${POSTGRES_USER:-postgres}" --dbname postgres \
    --set mlflow_password="$MLFLOW_DB_PASSWORD" \
    --set prefect_password="$PREFECT_DB_PASSWORD" <<'SQL'
CREATE ROLE mlflow LOGIN PASSWORD :'mlflow_password';
CREATE ROLE prefect LOGIN PASSWORD :'prefect_password';
CREATE DATABASE mlflow OWNER mlflow;
CREATE DATABASE mlflow_auth OWNER mlflow;
CREATE DATABASE prefect OWNER prefect;
REVOKE ALL ON DATABASE mlflow, mlflow_auth, prefect FROM PUBLIC;
SQL
echo "synthdx: created roles mlflow, prefect and databases mlflow, mlflow_auth, prefect"
