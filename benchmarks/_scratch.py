"""Scratch folders for benchmark artifacts, removed when the benchmark exits.

Why: a benchmark writes packages of hundreds of MB per run; left in /tmp they filled a machine's disk over a
few sessions and the next set-up failed with ENOSPC. `QEXPORT_BENCH_KEEP=1` keeps them for inspection.
"""
from __future__ import annotations

import atexit
import os
import shutil
import tempfile


def scratch_dir(prefix: str) -> str:
    path = tempfile.mkdtemp(prefix=prefix)
    if os.environ.get("QEXPORT_BENCH_KEEP") != "1":
        atexit.register(shutil.rmtree, path, True)
    else:
        print(f"(keeping {path}: QEXPORT_BENCH_KEEP=1)", flush=True)
    return path
