"""backend.memtune: a read that allocates a big buffer and shrinks it costs no fresh pages.

Each case runs in its own interpreter (malloc settings are per process and cannot be
undone): 2,000 ``recv(256 KiB)`` calls that each get 10 bytes, the pattern of
``SSLObject.read`` under uvloop's TLS transport, counting the process's minor page
faults.  Linux with glibc, like the rest of the suite (``.ci/run`` is Debian's).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

PROBE = """
import resource, socket, sys
from backend import memtune
tuned = memtune.tune() if sys.argv[1] == "tune" else None
a, b = socket.socketpair()
for _ in range(50):
    a.send(b"x" * 10); b.recv(262144)
f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(2000):
    a.send(b"x" * 10); b.recv(262144)
print(tuned, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
"""

def _probe(mode: str, **env: str) -> tuple[str, int]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("MALLOC_", "GLIBC_TUNABLES"))}
    out = subprocess.run(
        [sys.executable, "-c", PROBE, mode], cwd=ROOT, env=clean | env, capture_output=True, text=True, timeout=60, check=True
    ).stdout.split()
    return out[0], int(out[1])


def test_tuned_reads_reuse_the_heap_where_the_defaults_fault_in_fresh_pages():
    _, faults_default = _probe("plain")
    tuned, faults_tuned = _probe("tune")
    assert tuned == "True"
    assert faults_default >= 2000, faults_default  # an mmap per read, a page at least each
    assert faults_tuned < 100, faults_tuned


def test_settings_from_the_environment_are_left_alone():
    tuned, faults = _probe("tune", MALLOC_MMAP_THRESHOLD_="1048576")
    assert tuned == "False"
    assert faults >= 1000, faults  # the trim threshold is still glibc's: brk churn
