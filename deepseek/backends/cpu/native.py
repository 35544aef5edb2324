"""C kernels of the CPU backend, compiled on first use and loaded through ctypes.

Each ``<name>.c`` beside this module is plain C (no Python or PyTorch headers; the
``.h`` files beside it are shared) built
with ``gcc -O3 -march=native -fopenmp`` into ``$DEEPSEEK_CACHE_DIR/native`` (default
``~/.cache/deepseek/native``; a temporary directory where that cannot be written), keyed
by the sources, the compiler and this CPU's model and flags, so a machine compiles each
source once. OpenMP comes from the libgomp that
PyTorch has already loaded (the same soname), so these kernels share its thread pool
instead of starting a second one. Without a C compiler ``library`` returns None and
the kernels that need it are simply not among the candidates (``unavailable`` says why).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import shutil
import subprocess
import tempfile
import threading
from typing import Mapping

from deepseek.runtime.cache import cache_root

# -ffp-contract=fast: a * b + c as one FMA (ISO C modes such as -std=c99 turn that off,
# which halved the arithmetic rate of every kernel here)
_FLAGS = ["-O3", "-march=native", "-ffp-contract=fast", "-fopenmp", "-shared", "-fPIC", "-std=c99"]
_HERE = os.path.dirname(os.path.abspath(__file__))
_LOCK = threading.Lock()
_LIBS: dict[str, ctypes.CDLL | None] = {}
unavailable: dict[str, str] = {}  # library name -> why it could not be built
_TMP_DIR: str | None = None


def _cpu_key() -> str:
    """This CPU's model and feature flags (what -march=native compiles for)."""
    try:
        with open("/proc/cpuinfo") as f:
            lines = [ln for ln in f if ln.startswith(("model name", "flags"))]
        return "".join(sorted(set(lines)))
    except OSError:
        import platform

        return platform.processor() or platform.machine()


def _compiler() -> str | None:
    cc = os.environ.get("CC") or shutil.which("gcc") or shutil.which("cc")
    return cc if cc and shutil.which(cc) else None


def _out_dir() -> str:
    """Where built kernels go: the cache, or a private temporary directory where the cache
    cannot be written (a read-only home in a container): built once per process then."""
    base = cache_root()
    out_dir = os.path.join(base, "native")
    try:
        os.makedirs(out_dir, exist_ok=True)
        if os.access(out_dir, os.W_OK):
            return out_dir
    except OSError:
        pass
    global _TMP_DIR
    if _TMP_DIR is None:
        _TMP_DIR = tempfile.mkdtemp(prefix="deepseek-native-")
    return _TMP_DIR


@functools.cache
def _version(cc: str) -> list[str]:
    return subprocess.run([cc, "--version"], capture_output=True, text=True,
                          timeout=30).stdout.splitlines()[:1]


def _build(name: str, cc: str, extra: tuple[str, ...], c_file: str) -> str:
    source = b""
    for file in [c_file] + sorted(f for f in os.listdir(_HERE) if f.endswith(".h")):
        with open(os.path.join(_HERE, file), "rb") as f:  # the headers it may include too
            source += f.read()
    version = _version(cc)
    key = hashlib.sha256(source + repr((cc, version, _FLAGS, extra, _cpu_key())).encode()
                         ).hexdigest()
    path = os.path.join(_out_dir(), f"{name}_{key[:20]}.so")
    if not os.path.exists(path):
        tmp = f"{path}.{os.getpid()}.tmp"
        done = subprocess.run([cc, *_FLAGS, "-o", tmp, os.path.join(_HERE, c_file), *extra],
                              capture_output=True, text=True, timeout=300)
        if done.returncode != 0:
            raise RuntimeError(f"{cc} failed on {name}.c: {done.stderr.strip()[-2000:]}")
        os.replace(tmp, path)  # atomic: a concurrent process never loads half a file
    return path


def library(name: str, signatures: Mapping[str, tuple[list, object]],
            extra: tuple[str, ...] = (), source: str | None = None) -> ctypes.CDLL | None:
    """The compiled ``<name>.c`` (built once per machine), or None where it cannot be built.
    ``signatures``: each exported function's (argument types, result type), set on load;
    ``extra``: more compiler arguments (include paths, libraries to link); ``source``: the
    C file's name where it is not ``name`` (one file built two ways)."""
    with _LOCK:
        if name not in _LIBS:
            import torch  # noqa: F401  (its libgomp must be loaded first: see the module doc)

            cc = _compiler()
            lib = None
            if cc is None:
                unavailable[name] = "no C compiler (set CC or install gcc)"
            else:
                try:
                    lib = ctypes.CDLL(_build(name, cc, extra, f"{source or name}.c"))
                except (OSError, RuntimeError, subprocess.SubprocessError) as e:
                    unavailable[name] = str(e)
                for fn, (args, result) in signatures.items() if lib is not None else ():
                    getattr(lib, fn).argtypes, getattr(lib, fn).restype = args, result
            _LIBS[name] = lib
        return _LIBS[name]
