"""glibc malloc settings for the edge and the agent (``burrow serve`` / ``burrow agent``).

A relay process allocates and frees buffers of 32 KiB to 256 KiB all the time, and
glibc's defaults make many of them fresh pages from the kernel, each page faulted in
and zeroed, then handed back:

- ``SSLObject.read(n)`` (uvloop's TLS transport asks for 256 KiB) and ``sock.recv(n)``
  allocate ``n`` bytes and shrink the result to what came.  Above the mmap threshold
  (128 KiB until raised) that is an ``mmap``, an ``mremap`` down to a page or two, and a
  ``munmap``; the dynamic threshold never rises, as it only learns from chunks freed at
  full size, and these are freed shrunk.
- Freed memory at the top of the heap beyond the trim threshold goes back with
  ``brk`` and returns, page by page, at the next allocation.

Measured through an ngrok SDK session (TCP upload, ``iperf3``, edge CPU per MB): page
faults and ``munmap`` were ~24 % of the edge's samples under ``perf``; with the two
settings below they are ~0.2 %, and the edge's CPU per MB fell by about a quarter.
What it costs: up to :data:`TRIM_THRESHOLD` of freed heap stays in the process instead
of going back at once.

Settings given in the environment (``MALLOC_MMAP_THRESHOLD_``,
``MALLOC_TRIM_THRESHOLD_``, glibc's own tunables) are left as they are; on a C library
without ``mallopt`` (musl) nothing changes.
"""

from __future__ import annotations

import ctypes
import os
import sys

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 1 << 20  # allocations up to 1 MiB come from the heap, reused
TRIM_THRESHOLD = 16 << 20  # free heap kept before any is given back

_OVERRIDES = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "GLIBC_TUNABLES")


def tune() -> bool:
    """Set the two thresholds in this process; whether they were set."""
    if not sys.platform.startswith("linux") or any(os.environ.get(k) for k in _OVERRIDES):
        return False
    try:
        libc = ctypes.CDLL(None)
        mallopt = libc.mallopt
        if not hasattr(libc, "gnu_get_libc_version"):  # not glibc: its mallopt differs or does nothing
            return False
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
