"""Fill the site-packages that build/zipapp.sh puts in dist/scaleout.pyz: scaleout and its
dependencies for the build Python, plus the native extension modules of those dependencies for
every other CPython minor version that has wheels for all of them, so one .pyz runs under
any python3 >= 3.11 of the build platform.

Extension modules carry their Python version in their file name (`_multiarray_umath.cpython-312-
x86_64-linux-gnu.so`), so the same release of numpy for 3.11, 3.12 and 3.13 unpacks side by side
into one folder: each interpreter loads its own. Packages built for the stable ABI (abi3:
cryptography, safetensors) and pure-Python ones serve every version as they are.

Usage: python build/zipapp_site.py SITE_DIR     (prints the versions it carries, e.g. 3.11 3.12)
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CANDIDATES = ["3.11", "3.12", "3.13", "3.14", "3.15"]


def pip(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "pip", "--disable-pip-version-check", *args], capture_output=True, text=True)


def native_distributions(site: Path, tag: str) -> dict[str, str]:
    """name -> version of every installed distribution with an extension module for ``tag``."""
    found = {}
    for record in site.glob("*.dist-info/RECORD"):
        if any(f".{tag}-" in line.split(",")[0] for line in record.read_text().splitlines()):
            meta = (record.parent / "METADATA").read_text(errors="replace").splitlines()
            name = next(line.split(":", 1)[1].strip() for line in meta if line.startswith("Name:"))
            version = next(line.split(":", 1)[1].strip() for line in meta if line.startswith("Version:"))
            found[name] = version
    return found


def platforms() -> list[str]:
    from packaging import tags  # pip vendors it too; the build venv has it

    seen: list[str] = []
    for t in tags.sys_tags():
        if t.platform not in seen:
            seen.append(t.platform)
    return seen


def main(site: Path) -> int:
    build = "%d.%d" % sys.version_info[:2]
    if site.exists():
        shutil.rmtree(site)
    r = pip("install", "--quiet", "--target", str(site), str(ROOT))
    if r.returncode != 0:
        print(r.stdout + r.stderr, file=sys.stderr)
        return 1
    native = native_distributions(site, f"cpython-{build.replace('.', '')}")
    carried = [build]
    platform_args = [arg for p in platforms() for arg in ("--platform", p)]
    for version in (v for v in CANDIDATES if v != build):
        with tempfile.TemporaryDirectory() as tmp:
            r = pip("install", "--quiet", "--no-deps", "--only-binary=:all:", "--target", tmp,
                    "--python-version", version, "--implementation", "cp", *platform_args,
                    *(f"{name}=={ver}" for name, ver in native.items()))
            if r.returncode != 0:
                last = (r.stderr.strip().splitlines() or ["?"])[-1]
                print(f"zipapp: not carrying Python {version}: {last}", file=sys.stderr)
                continue
            for path in Path(tmp).rglob("*"):
                rel = path.relative_to(tmp)
                if path.is_dir() or rel.parts[0].endswith(".dist-info") or rel.parts[0] == "bin":
                    continue
                dest = site / rel
                if not dest.exists():  # version-tagged modules and vendored libraries; the rest is the same release's
                    dest.parent.mkdir(parents=True, exist_ok=True)
                    shutil.copy2(path, dest)
        carried.append(version)
    print(" ".join(carried))
    return 0


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1])))
