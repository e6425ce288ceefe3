#!/usr/bin/env bash
# One command for the comparison benchmark (issue 8): installs nginx, wrk, iperf3, socat
# and openssh (apt-get) and mitmproxy (its own venv under ~/.cache/burrow-bench) if
# missing, runs every path in interleaved rounds and writes tests/benchmarks/results.md.
#   tests/benchmarks/run.sh               # full run, ~10 minutes on 2 cores
#   tests/benchmarks/run.sh --quick       # smoke test, 1 round of 2 s loads
#   tests/benchmarks/run.sh --scale ...   # bench_scale.py instead (1,000 tunnels, 10k conns)
# It runs .venv/bin/python (the README's install), or $PYTHON.
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
if ! "$PY" -c 'import backend.cli, httpx, uvloop, prometheus_client' 2>/dev/null; then
    echo "run.sh: $PY cannot run burrow (install it first, as the README says: python3 -m venv .venv && .venv/bin/pip install -e '.[test]'; or set PYTHON)" >&2
    exit 2
fi
if [ "${1:-}" = "--scale" ]; then
    shift
    exec "$PY" tests/benchmarks/bench_scale.py "$@"
fi
exec "$PY" tests/benchmarks/bench_compare.py "$@"
