"""pip's resolver over the GPU profile for Linux x86_64 / CPython 3.12, without installing anything.

Run by scripts/check_gpu_requirements.sh inside a throwaway venv that holds a pinned pip; standard library only, so
that it runs on any machine (the CPU CI machine has neither CUDA nor Python 3.12).

Three things stand between a plain `pip install --dry-run --platform ...` and an answer, each handled here:
- pip expands only the legacy `manylinux2014`/`2010` tags, not PEP 600 ones: `--platform manylinux_2_28_x86_64` alone
  rejects every `manylinux_2_17` wheel. All tags a glibc 2.39 system accepts are passed (GLIBC_MINORS).
- A foreign `--platform` needs `--only-binary=:all:`, so a package that PyPI ships only as source cannot be resolved.
  SOURCE_ONLY names them; each is represented by a metadata-only wheel made from its sdist's PKG-INFO (its name,
  version and declared requirements), so that what it requires is resolved with everything else. The real package
  is built at install time (scripts/install.sh --gpu, the Dockerfile).
- The PyPI this runs against may not serve PEP 658 metadata files, and without them pip downloads every wheel whole
  to read its dependencies (several GB here: torch, the CUDA libraries, vllm). `--use-feature=fast-deps` reads
  each wheel's metadata through HTTP range requests instead. The bytes received are counted and capped.
"""

from __future__ import annotations

import argparse
import io
import json
import re
import ssl
import subprocess
import sys
import tarfile
import time
import urllib.request
import zipfile
from pathlib import Path

PYTHON_VERSION = "3.12"
# manylinux_2_39 ... manylinux_2_5: what Ubuntu 24.04 (glibc 2.39; the Dockerfile's base, current NGC images) accepts.
# (vllm's llguidance 1.7 has no wheel below manylinux_2_31.)
GLIBC_MINORS = range(39, 4, -1)
LEGACY_MANYLINUX = ("manylinux2014", "manylinux2010", "manylinux1")  # aliases of 2_17, 2_12, 2_5
# package -> (its version: `pin:<requirements-gpu.txt name>` or the version a dependency pins, why it has no wheel,
# who builds it). A new source-only dependency fails the dry run with "No matching distribution found for X": add it.
SOURCE_ONLY = {
    "transformer-engine-torch": (
        "pin:transformer-engine",
        "Transformer Engine's PyTorch extension: C++/CUDA code compiled against the installed torch",
        "the Dockerfile and scripts/install.sh --gpu build it (pip --no-build-isolation; needs nvcc and cuDNN headers)",
    ),
    "antlr4-python3-runtime": ("pin:antlr4-python3-runtime", "pure Python, published as an sdist only",
                               "pip builds it at install time in seconds (no compiler)"),
    "cellpylib": ("2.4.0", "pure Python, published as an sdist only; reasoning-gym 0.1.25 pins it",
                  "pip builds it at install time in seconds (no compiler)"),
    "zss": ("1.2.0", "pure Python, published as an sdist only; reasoning-gym 0.1.25 needs >=1.2.0 (the latest)",
            "pip builds it at install time in seconds (no compiler)"),
    "pycosat": ("0.6.6", "a small C extension without a CPython 3.12 wheel; reasoning-gym 0.1.25 pins it",
                "pip compiles it at install time (needs gcc and the Python headers: build-essential, python3.12-dev)"),
}
MAX_DOWNLOAD_MB = 300  # the dry run reads index pages and wheel metadata only; far more means whole wheels came down
DEFAULT_INDEX = "https://pypi.org/simple"


def platform_args() -> list[str]:
    tags = [f"manylinux_2_{minor}_x86_64" for minor in GLIBC_MINORS] + [f"{t}_x86_64" for t in LEGACY_MANYLINUX]
    return [arg for tag in tags for arg in ("--platform", tag)]


def normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def read_pins(path: Path) -> dict[str, str]:
    """`name[extras]==version` lines of a requirements file as normalized name -> version."""
    pins = {}
    for line in path.read_text().splitlines():
        match = re.match(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)(\[[^\]]*\])?==([^\s;#]+)", line)
        if match:
            pins[normalize(match.group(1))] = match.group(3)
    return pins


# ------------------------------------------------------------------------------------------ source-only packages


def index_files(index: str, name: str, counter: list[int]) -> list[dict]:
    request = urllib.request.Request(f"{index.rstrip('/')}/{normalize(name)}/",
                                     headers={"Accept": "application/vnd.pypi.simple.v1+json"})
    with urllib.request.urlopen(request, timeout=60) as response:
        body = response.read()
    counter[0] += len(body)
    return json.loads(body)["files"]


def pkg_info_of_sdist(url: str, counter: list[int]) -> str:
    with urllib.request.urlopen(url, timeout=120) as response:
        data = response.read()
    counter[0] += len(data)
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as archive:
        member = min((m for m in archive.getmembers() if m.name.endswith("/PKG-INFO")), key=lambda m: m.name.count("/"))
        return archive.extractfile(member).read().decode()


def metadata_only_wheel(pkg_info: str, directory: Path) -> Path:
    """A py3-none-any wheel holding only the sdist's core metadata: name, version, Requires-Python, Requires-Dist.
    (`Dynamic:` lines are dropped: in a wheel every field is final.)"""
    kept = [line for line in pkg_info.split("\n\n", 1)[0].splitlines()
            if line.split(":", 1)[0] in ("Metadata-Version", "Name", "Version", "Requires-Python", "Requires-Dist",
                                          "Provides-Extra")]
    fields = dict(line.split(": ", 1) for line in kept if line.startswith(("Name:", "Version:")))
    dist = f"{re.sub(r'[-_.]+', '_', fields['Name'])}-{fields['Version']}"
    wheel = directory / f"{dist}-py3-none-any.whl"
    files = {f"{dist}.dist-info/METADATA": "\n".join(kept) + "\n",
             f"{dist}.dist-info/WHEEL": "Wheel-Version: 1.0\nGenerator: cipo_nemo stand-in\nRoot-Is-Purelib: true\n"
                                        "Tag: py3-none-any\n"}
    files[f"{dist}.dist-info/RECORD"] = "".join(f"{path},,\n" for path in [*files, f"{dist}.dist-info/RECORD"])
    with zipfile.ZipFile(wheel, "w") as archive:
        for path, text in files.items():
            archive.writestr(path, text)
    return wheel


def stand_in_for(name: str, version: str, index: str, directory: Path, counter: list[int]) -> str:
    files = [f for f in index_files(index, name, counter) if _name_and_version(f["filename"]) == (normalize(name), version)]
    sdists = [f for f in files if f["filename"].endswith(".tar.gz")]
    wheels = [f["filename"] for f in files if f["filename"].endswith(".whl") and _fits_linux_x86_64(f["filename"])]
    if not sdists:
        raise SystemExit(f"{name}=={version}: no sdist on {index}; is the pin in requirements-gpu.txt right?")
    metadata_only_wheel(pkg_info_of_sdist(sdists[0]["url"], counter), directory)
    if wheels:  # then it no longer needs a stand-in: say so rather than hide it
        return f"NOTE: {name}=={version} now has a wheel ({wheels[0]}); drop it from SOURCE_ONLY"
    return ""


def _name_and_version(filename: str) -> tuple[str, str]:
    """Wheels: name-version-...whl (name with underscores); sdists: name-version.tar.gz (the name may hold hyphens)."""
    if filename.endswith(".whl"):
        name, version = filename.split("-")[:2]
    else:
        name, version = re.sub(r"\.(tar\.gz|zip)$", "", filename).rsplit("-", 1)
    return normalize(name), version


def _fits_linux_x86_64(wheel: str) -> bool:
    tags = wheel[:-4].split("-")[-3:]
    return tags[2] == "any" or ("x86_64" in tags[2] and "manylinux" in tags[2] and tags[0] in ("py3", "cp312"))


# ------------------------------------------------------------------------------------------ pip with a byte count


def run_pip_counting(args: list[str], count_file: Path) -> int:
    """pip in this process, counting the bytes that arrive over TLS (index pages, metadata ranges, whole wheels)."""
    received = [0]
    original = ssl.SSLSocket.recv_into

    def counting(self, buffer, nbytes=0, flags=0):
        n = original(self, buffer, nbytes, flags)
        received[0] += n
        return n

    ssl.SSLSocket.recv_into = counting
    from pip._internal.cli.main import main as pip_main

    try:
        return pip_main(args)
    finally:
        count_file.write_text(str(received[0]))


def pip_dry_run(pip_args: list[str], work: Path, label: str) -> tuple[int, int, float]:
    count_file = work / f"{label}.bytes"
    started = time.monotonic()
    code = subprocess.run([sys.executable, __file__, "--pip", str(count_file), "--", *pip_args]).returncode
    return code, int(count_file.read_text() or 0) if count_file.exists() else 0, time.monotonic() - started


def common_pip_args() -> list[str]:
    return ["install", "--dry-run", "--ignore-installed", "--quiet", "--no-cache-dir", "--use-feature=fast-deps",
            *platform_args(), "--python-version", PYTHON_VERSION, "--implementation", "cp", "--only-binary=:all:"]


def check(repo: Path, work: Path, index: str) -> int:
    started = time.monotonic()
    pins = read_pins(repo / "requirements-gpu.txt")
    counter = [0]
    stand_ins = work / "stand_ins"
    stand_ins.mkdir()
    for name, (version, why, builder) in SOURCE_ONLY.items():
        version = pins[normalize(version[4:])] if version.startswith("pin:") else version
        note = stand_in_for(name, version, index, stand_ins, counter)
        print(f"source only: {name}=={version} ({why}); resolved here through the requirements its sdist declares; "
              f"{builder}")
        if note:
            print(note)

    report = work / "report.json"
    code, gpu_bytes, gpu_s = pip_dry_run(
        [*common_pip_args(), "--find-links", str(stand_ins), "--report", str(report),
         "-r", str(repo / "requirements-gpu.txt")], work, "gpu")
    if code != 0:
        print(f"FAIL: requirements-gpu.txt does not resolve for Linux x86_64 / CPython {PYTHON_VERSION} (pip above)")
        return 1
    code, nodeps_bytes, nodeps_s = pip_dry_run(
        [*common_pip_args(), "--no-deps", "-r", str(repo / "requirements-nodeps.txt")], work, "nodeps")
    if code != 0:
        print(f"FAIL: requirements-nodeps.txt (installed with --no-deps) has no wheel for Linux x86_64 / CPython "
              f"{PYTHON_VERSION} (pip above)")
        return 1

    installs = json.loads(report.read_text())["install"]
    resolved = {normalize(item["metadata"]["name"]): item["metadata"]["version"] for item in installs}
    problems = [f"requirements-gpu.txt pins {name}=={version} but pip resolved {resolved.get(name)}"
                for name, version in pins.items() if resolved.get(name) != version]
    total_mb = (counter[0] + gpu_bytes + nodeps_bytes) / 1e6
    if total_mb > MAX_DOWNLOAD_MB:
        problems.append(f"the dry run downloaded {total_mb:.0f} MB (cap {MAX_DOWNLOAD_MB} MB): whole wheels were fetched "
                        "instead of their metadata (does the index answer HTTP range requests?)")
    shown = ", ".join(f"{n} {resolved[n]}" for n in ("torch", "vllm", "transformer-engine-cu13",
                                                      "transformer-engine-torch", "transformers", "triton", "ray")
                      if n in resolved)
    print(f"resolved {len(resolved)} packages for Linux x86_64 (glibc 2.39) / CPython {PYTHON_VERSION}: {shown}")
    print(f"time {time.monotonic() - started:.1f} s (resolver {gpu_s:.1f} s + {nodeps_s:.1f} s), downloaded "
          f"{total_mb:.1f} MB (index pages and wheel metadata; sdists of the source-only packages "
          f"{counter[0] / 1e6:.1f} MB)")
    for problem in problems:
        print(f"FAIL: {problem}")
    return 1 if problems else 0


def main() -> int:
    if len(sys.argv) > 2 and sys.argv[1] == "--pip":
        return run_pip_counting(sys.argv[sys.argv.index("--") + 1:], Path(sys.argv[2]))
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repo", type=Path, required=True)
    parser.add_argument("--work", type=Path, required=True, help="an empty scratch directory")
    parser.add_argument("--index", default=DEFAULT_INDEX, help="simple index (PEP 691 JSON) of the source-only sdists")
    args = parser.parse_args()
    return check(args.repo.resolve(), args.work, args.index)


if __name__ == "__main__":
    sys.exit(main())
