"""The server roles run numpy's BLAS on one thread (OpenBLAS's idle threads spin after each
of the update check's dot products); a client keeps the default, and a value the user set stays."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

# In a fresh interpreter: the role's command is replaced by a probe that loads numpy as the
# role would and prints how many threads OpenBLAS (the BLAS numpy's wheels bundle) uses.
PROBE = r"""
import ctypes, sys
from scaleout import cli
from scaleout.commands import launch

def probe(args):
    import numpy
    numpy.dot(numpy.ones(4), numpy.ones(4))
    paths = {line.split()[-1] for line in open("/proc/self/maps") if "openblas" in line.lower()}
    for path in paths:
        lib = ctypes.CDLL(path)
        for name in ("scipy_openblas_get_num_threads64_", "openblas_get_num_threads64_", "openblas_get_num_threads"):
            if hasattr(lib, name):
                print(getattr(lib, name)())
                return 0
    print("none")
    return 0

launch.serve = launch.combine = launch.join = probe
sys.exit(cli.main(sys.argv[1:]))
"""


def blas_threads(args: list[str], **env: str) -> str:
    environ = {k: v for k, v in os.environ.items() if k not in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    done = subprocess.run([sys.executable, "-c", PROBE, *args], env={**environ, **env}, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    out = done.stdout.strip()
    if out == "none":
        pytest.skip("numpy here does not use OpenBLAS")
    return out


@pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="one core: OpenBLAS uses one thread anyway")
def test_server_roles_use_one_blas_thread_clients_keep_the_default() -> None:
    assert blas_threads(["serve"]) == "1"
    assert blas_threads(["combine", "--controller", "wss://127.0.0.1:1", "--token", "t"]) == "1"
    assert blas_threads(["join", "--controller", "wss://127.0.0.1:1", "--token", "t"]) != "1"
    assert blas_threads(["serve"], OPENBLAS_NUM_THREADS="2") == "2"  # the user's choice stays


# The server roles let malloc keep buffers under 4 MiB on its heap (mallopt): a 2 MiB buffer
# is not mapped on its own (mallinfo2's hblkhd: bytes in mapped blocks), unless the user tuned malloc.
MALLOC_PROBE = r"""
import ctypes, sys
from scaleout import cli
from scaleout.commands import launch

class Info(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]

def probe(args):
    mallinfo2 = ctypes.CDLL(None).mallinfo2
    mallinfo2.restype = Info
    before = mallinfo2().hblkhd
    buffer = bytearray(2 << 20)
    print(mallinfo2().hblkhd - before)
    return 0

launch.serve = launch.combine = probe
sys.exit(cli.main(sys.argv[1:]))
"""


def mapped_growth(args: list[str], **env: str) -> int:
    environ = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k != "GLIBC_TUNABLES"}
    done = subprocess.run([sys.executable, "-c", MALLOC_PROBE, *args], env={**environ, **env}, capture_output=True, text=True, timeout=60)
    if "mallinfo2" in done.stderr:
        pytest.skip("no glibc mallinfo2 here")
    assert done.returncode == 0, done.stderr
    return int(done.stdout)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")
def test_server_roles_keep_buffers_of_a_few_mib_on_the_heap() -> None:
    assert mapped_growth(["serve"]) == 0
    assert mapped_growth(["combine", "--controller", "wss://127.0.0.1:1", "--token", "t"]) == 0
    assert mapped_growth(["serve"], MALLOC_ARENA_MAX="2") >= 2 << 20  # the user's own malloc settings: left alone
