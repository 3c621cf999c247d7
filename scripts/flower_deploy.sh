#!/usr/bin/env bash
# The federation on a real Flower deployment, on this machine: a SuperLink and NODES SuperNodes on
# 127.0.0.1 (--insecure: loopback only), `flwr run flower_app loopback --stream`, then every process
# started here is stopped (also on failure, Ctrl-C or SIGTERM). Arguments are run-config entries.
#
#   NODES=3 scripts/flower_deploy.sh num_rounds=2 stage=1
#   NODES=3 THREADS=1 scripts/flower_deploy.sh stage=3 init=runs/flower_deploy_s1 features=features/ml-1m
#   MODE=simulate NODES=4 scripts/flower_deploy.sh num_rounds=2        # the local simulation instead
#
# FLWR_HOME defaults to the git-ignored .flwr/ of the repository (config.toml and logs/ go there).
# See docs/flower.md (TLS and SuperNode authentication for deployments across machines).
set -euo pipefail
cd "$(dirname "$0")/.."
export FLWR_TELEMETRY_ENABLED=0 FLWR_DISABLE_UPDATE_CHECK=1 FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1
export RAY_USAGE_STATS_ENABLED=0 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
PY=${PYTHON:-.venv/bin/python}
args=()
for entry in "$@"; do args+=(-c "$entry"); done
extra=()
if [[ "${MODE:-deploy}" == deploy && -n "${THREADS:-}" ]]; then extra+=(--threads "$THREADS"); fi
exec "$PY" -m feddmmr.flower.deploy "${MODE:-deploy}" --nodes "${NODES:-3}" --flwr-home "${FLWR_HOME:-.flwr}" \
    "${extra[@]}" "${args[@]}"
