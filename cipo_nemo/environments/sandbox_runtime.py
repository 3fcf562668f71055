"""What of the host a sandboxed program sees: its interpreter, the standard library and their shared libraries.

The sandbox builds the program's file system from an allow list (see
:mod:`cipo_nemo.environments.sandbox_launcher`): a fresh tmpfs root, into which the paths of a :class:`RuntimeView`
are bind-mounted read-only at their own host paths. This module finds those paths for an interpreter, once per
interpreter, by asking the interpreter itself (:data:`_PROBE`): it imports every extension module of its standard
library and reports ``sys.path`` and the files mapped into its memory (``/proc/self/maps``), which are the
executable, ``libpython`` and every shared library the runtime can load. Exposed are the executable file itself,
the standard library directories and the directories of those libraries, minus the interpreter's own site-packages;
the dynamic loader's own path (``PT_INTERP``, e.g. ``/lib64/ld-linux-x86-64.so.2``) and every symlink on the way to
it are recreated as symlinks.
"""

from __future__ import annotations

import functools
import json
import os
import struct
import subprocess
from dataclasses import dataclass

from cipo_nemo.environments.sandbox_launcher import PROGRAM_ENV

_PROBE_TIMEOUT_S = 60.0
_PT_INTERP = 3
_REPLACED = ("/tmp", "/proc", "/dev")  # the sandbox's own in the view, so no runtime path may lie under them
_MAX_SYMLINKS = 40  # the kernel's own limit on symlinks followed while resolving one path

# Runs as ``python -I -S -c _PROBE`` (as the sandbox runs programs). Importing every extension module maps the
# shared libraries a program could need (libssl for ssl, libffi for ctypes, ...).
_PROBE = """
import json, os, sys
dynload = [p for p in sys.path if os.path.basename(p) == "lib-dynload" and os.path.isdir(p)]
for directory in dynload:
    for name in sorted(os.listdir(directory)):
        try:
            __import__(name.split(".")[0])
        except Exception:
            pass
mapped = set()
with open("/proc/self/maps") as maps:
    for line in maps:
        fields = line.split(maxsplit=5)
        if len(fields) == 6 and fields[5].startswith("/"):
            mapped.add(fields[5].rstrip("\\n"))
import sysconfig
site = {sysconfig.get_path(name) for name in ("purelib", "platlib")}
print(json.dumps({"path": [p for p in sys.path if os.path.exists(p)], "mapped": sorted(mapped), "site": sorted(site)}))
"""


def is_under(path: str, directory: str) -> bool:
    return path == directory or path.startswith(directory.rstrip("/") + "/")


@dataclass(frozen=True)
class RuntimeView:
    """Host paths bind-mounted read-only at the same path (``files`` and ``directories``, real paths, none
    under another), ``links`` (path, target) recreated as symlinks, parents first, and ``covered``
    directories inside the exposed ones replaced by empty ones (the interpreter's site-packages: third-party
    code is not part of the runtime)."""

    files: tuple[str, ...]
    directories: tuple[str, ...]
    links: tuple[tuple[str, str], ...]
    covered: tuple[str, ...] = ()


@functools.cache
def runtime_view(python: str) -> RuntimeView:
    """The view for interpreter ``python`` (a real path). Raises OSError if the interpreter cannot be probed."""
    try:
        probe = subprocess.run([python, "-I", "-S", "-c", _PROBE], capture_output=True, text=True, env=PROGRAM_ENV,
                               cwd="/", timeout=_PROBE_TIMEOUT_S, check=False)
    except subprocess.TimeoutExpired as exc:
        raise OSError(f"probing the interpreter {python} took over {_PROBE_TIMEOUT_S:.0f} s") from exc
    if probe.returncode != 0:
        raise OSError(f"probing the interpreter {python} failed: {probe.stderr.strip()[-500:]}")
    found = json.loads(probe.stdout.splitlines()[-1])  # the last line: an import may have printed
    mapped = [os.path.realpath(path) for path in found["mapped"] if os.path.isfile(path)]
    candidates = {os.path.realpath(path) for path in found["path"] if os.path.isdir(path)}
    candidates |= {os.path.dirname(path) for path in mapped if path != python}
    directories = _outermost(candidates)
    replaced = [path for path in (*directories, python) if any(is_under(path, top) for top in _REPLACED)]
    if replaced:
        raise OSError(f"the interpreter's runtime lies under {replaced[0]}, which the sandbox replaces; "
                      "use an interpreter installed elsewhere")
    files = () if any(is_under(python, directory) for directory in directories) else (python,)
    loader = _elf_interpreter(python)
    links = _symlinks_on_the_way(loader) if loader else ()
    # A link inside an exposed directory comes with it.
    links = tuple(link for link in links if not any(is_under(link[0], directory) for directory in directories))
    site = {os.path.realpath(path) for path in found["site"] if os.path.isdir(path)}
    covered = tuple(sorted(path for path in site if any(is_under(path, directory) for directory in directories)))
    return RuntimeView(files=files, directories=directories, links=links, covered=covered)


def _outermost(paths: set[str]) -> tuple[str, ...]:
    return tuple(sorted(path for path in paths if not any(other != path and is_under(path, other) for other in paths)))


def _elf_interpreter(executable: str) -> str | None:
    """The ``PT_INTERP`` path of a 64-bit little-endian ELF executable (None for a static or other binary)."""
    with open(executable, "rb") as file:
        header = file.read(64)
        if header[:6] != b"\x7fELF\x02\x01":
            return None
        program_headers, = struct.unpack_from("<Q", header, 0x20)
        entry_size, count = struct.unpack_from("<HH", header, 0x36)
        for index in range(count):
            file.seek(program_headers + index * entry_size)
            kind, _, offset, _, _, size = struct.unpack("<IIQQQQ", file.read(40))
            if kind == _PT_INTERP:
                file.seek(offset)
                return file.read(size).rstrip(b"\0").decode()
    return None


def _symlinks_on_the_way(path: str) -> tuple[tuple[str, str], ...]:
    """Every symlink met while resolving ``path`` (absolute), as (link, target), in the order met."""
    links: list[tuple[str, str]] = []
    pending = path.strip("/").split("/")
    current = "/"
    while pending:
        candidate = os.path.join(current, pending.pop(0))
        if os.path.islink(candidate):
            if len(links) == _MAX_SYMLINKS:
                raise OSError(f"too many symlinks resolving {path}")
            target = os.readlink(candidate)
            links.append((candidate, target))
            pending = target.strip("/").split("/") + pending
            current = "/" if target.startswith("/") else current
        else:
            current = os.path.normpath(candidate)
    return tuple(links)
