"""build/launcher.c and build/pack_frozen.py, the one-file executable's wrapper, on a tiny
program: it unpacks once into the cache, runs the program in its own process with the user's
arguments and exit code, shares one copy between first starts at once, and refuses a damaged
or truncated file and an unwritable cache in one line. make dist-check runs the real build."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "build"))
import pack_frozen  # noqa: E402

CC = shutil.which(os.environ.get("CC", "cc"))
pytestmark = pytest.mark.skipif(CC is None or not Path("/usr/include/zlib.h").exists(), reason="needs a C compiler and zlib's headers")


@pytest.fixture(scope="module")
def launcher(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("launcher") / "launcher"
    subprocess.run([CC, "-O2", "-o", str(out), str(ROOT / "build" / "launcher.c"), "-lz"], check=True, capture_output=True)
    return out


@pytest.fixture
def program(tmp_path: Path, launcher: Path) -> Path:
    folder = tmp_path / "folder"
    (folder / "lib" / "deep").mkdir(parents=True)
    (folder / "lib" / "deep" / "data.bin").write_bytes(os.urandom(300_000))
    (folder / "lib" / "alias").symlink_to("deep/data.bin")
    script = folder / "scaleout"
    script.write_text(
        '#!/bin/sh\nhere=$(dirname "$0")\n'
        'echo "pid=$$ args=$*" ; echo "artefact=$SCALEOUT_ARTEFACT"\n'
        'cmp -s "$here/lib/alias" "$here/lib/deep/data.bin" && echo linked\n'
        'exit "${EXIT:-0}"\n'
    )
    script.chmod(0o755)
    out = tmp_path / "scaleout"
    pack_frozen.pack(launcher, folder, out)
    return out


def run(exe: Path, *args: str, cache: Path, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(exe), *args], capture_output=True, text=True, timeout=60,
                          env={**os.environ, "SCALEOUT_CACHE": str(cache), **env})


def test_unpacks_once_and_runs_the_program_with_its_arguments_and_exit_code(program: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    r = run(program, "join", "--name", "a b", cache=cache, EXIT="7")
    assert r.returncode == 7, r.stderr
    assert "args=join --name a b" in r.stdout and "linked" in r.stdout
    assert f"artefact={program}" in r.stdout
    (copy,) = cache.iterdir()
    assert copy.name.startswith("frozen-") and (copy / ".complete").exists()
    assert oct(cache.stat().st_mode & 0o777) == "0o700"
    stamp = (copy / "scaleout").stat().st_mtime_ns
    assert run(program, "--version", cache=cache).returncode == 0
    assert (copy / "scaleout").stat().st_mtime_ns == stamp  # not unpacked again
    assert [p.name for p in cache.iterdir()] == [copy.name]


def test_first_starts_at_once_share_one_copy(program: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    procs = [subprocess.Popen([str(program), "x"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env={**os.environ, "SCALEOUT_CACHE": str(cache)}) for _ in range(6)]
    for p in procs:
        out, err = p.communicate(timeout=60)
        assert p.returncode == 0 and "args=x" in out, err
    assert len(list(cache.iterdir())) == 1


def test_a_new_version_keeps_two_older_ones(launcher: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    folder = tmp_path / "f"
    folder.mkdir()
    made = []
    for i in range(5):
        (folder / "scaleout").write_text(f"#!/bin/sh\necho v{i}\n")
        (folder / "scaleout").chmod(0o755)
        pack_frozen.pack(launcher, folder, tmp_path / "exe")
        before = set(cache.iterdir()) if cache.exists() else set()
        assert run(tmp_path / "exe", cache=cache).stdout.strip() == f"v{i}"
        (new,) = set(cache.iterdir()) - before
        os.utime(new, (1e9 + i, 1e9 + i))  # the order they were unpacked in, whatever the clock's resolution
        made.append(new.name)
    assert sorted(p.name for p in cache.iterdir()) == sorted(made[2:])


@pytest.mark.parametrize("damage", ["truncated", "zeroed", "no-trailer"])
def test_a_damaged_file_says_download_it_again(program: Path, tmp_path: Path, damage: str) -> None:
    data = program.read_bytes()
    half = len(data) // 2
    bad = {"truncated": data[:half], "zeroed": data[:half] + bytes(8192) + data[half + 8192:], "no-trailer": data[:-64]}[damage]
    exe = tmp_path / "bad"
    exe.write_bytes(bad)
    exe.chmod(0o755)
    cache = tmp_path / "cache"
    r = run(exe, cache=cache)
    assert r.returncode == 1
    assert "download it again" in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert not cache.exists() or not list(cache.iterdir())  # nothing half-unpacked left behind


def test_an_unwritable_cache_is_one_line_naming_the_fix(program: Path, tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    r = run(program, cache=blocker / "cache")
    assert r.returncode == 1
    assert "SCALEOUT_CACHE" in r.stderr and str(blocker) in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
