"""Compile `kernels.c` once per machine and load it with ctypes.

The shared library is built with the system C compiler (``$CC``, else ``cc`` / ``gcc``) for
the CPU it runs on (``-march=native``; with OpenMP where the compiler has it, else serial)
and kept under ``$PAGEDLLM_CACHE_DIR/cpu-kernels/``
(default ``~/.cache/pagedllm``), named by a hash of the source, the flags, the compiler and
the CPU, so a later start only loads it (about a millisecond). The build takes a fraction
of a second. No compiler, a failed build or ``PAGEDLLM_CPU_KERNELS=0``: `load_library`
returns None and the layers keep their torch code; ``PAGEDLLM_CPU_KERNELS=exact`` keeps
only the kernels that are bit for bit torch's (`exact_only`).
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

from pagedllm.models.loader.file_cache import cache_root

logger = logging.getLogger(__name__)

SWITCH_ENV = "PAGEDLLM_CPU_KERNELS"
SOURCE = Path(__file__).with_name("kernels.c")
FLAGS = ("-O3", "-march=native", "-fPIC", "-shared", "-std=c11") + (
    ("-mprefer-vector-width=512",) if platform.machine() in ("x86_64", "AMD64") else ())
# OpenMP for the decode attention's rows (the process's runtime: the one torch loaded);
# without it the kernels build serial, their simd loops still vectorized.
OPENMP = ("-fopenmp",)
NO_OPENMP = ("-fopenmp-simd",)
KEEP_BUILDS = 4  # builds kept in the cache folder (a few versions sharing one cache)


def enabled() -> bool:
    """False when ``PAGEDLLM_CPU_KERNELS`` is 0 / false / no / off."""
    return os.environ.get(SWITCH_ENV, "1").lower() not in ("0", "false", "no", "off")


def exact_only() -> bool:
    """True when ``PAGEDLLM_CPU_KERNELS=exact``: only the kernels that reproduce torch bit
    for bit (norm, rotary, SiLU-and-mul); the decode attention stays SDPA's."""
    return os.environ.get(SWITCH_ENV, "1").lower() == "exact"


def find_compiler() -> str | None:
    """The C compiler to build with: ``$CC``, else ``cc`` or ``gcc`` on the PATH."""
    cc = os.environ.get("CC")
    if cc:
        return shutil.which(cc) or cc
    return shutil.which("cc") or shutil.which("gcc")


def _cpu_signature() -> str:
    """What -march=native depends on: the CPU's model name and feature flags."""
    try:
        text = Path("/proc/cpuinfo").read_text(errors="replace")
    except OSError:
        return platform.processor() or platform.machine()
    wanted = ("model name", "flags", "Features", "CPU part")
    lines = {ln.split(":", 1)[0].strip(): ln for ln in text.splitlines()
             if ln.split(":", 1)[0].strip() in wanted}
    return platform.machine() + "|" + "|".join(sorted(lines.values()))


def library_path(compiler: str) -> Path:
    """Where the library built by `compiler` for this CPU and source is cached."""
    key = hashlib.sha256("\n".join(
        (SOURCE.read_text(), " ".join(FLAGS + OPENMP), compiler, _cpu_signature())).encode())
    return cache_root() / "cpu-kernels" / f"kernels-{key.hexdigest()[:24]}.so"


def build(compiler: str, target: Path) -> None:
    """Compile the kernels into `target` (written under a temporary name, then renamed, so
    concurrent starts never load a half-written file), with OpenMP where the compiler has
    it. Raises on a failed build."""
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    try:
        for extra in (OPENMP, NO_OPENMP):
            done = subprocess.run([compiler, *FLAGS, *extra, "-o", tmp, str(SOURCE), "-lm"],
                                  capture_output=True, text=True, timeout=120)
            if done.returncode == 0:
                break
        done.check_returncode()
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    prune(target.parent, keep=KEEP_BUILDS)


def prune(folder: Path, keep: int) -> None:
    """Delete all but the `keep` newest builds in `folder` (older sources, compilers or
    CPUs); best effort: a file another process removed or still uses is left alone."""
    builds = sorted(folder.glob("kernels-*.so"), key=lambda p: p.stat().st_mtime,
                    reverse=True)
    for old in builds[keep:]:
        try:
            old.unlink()
        except OSError:
            pass


def load_library() -> ctypes.CDLL | None:
    """The compiled kernels, built first when not cached; None when unavailable."""
    if not enabled():
        return None
    compiler = find_compiler()
    if compiler is None:
        logger.info("No C compiler found: the CPU decode step runs without its fused "
                    "kernels (set CC, or install gcc, for a faster step).")
        return None
    target = library_path(compiler)
    try:
        if not target.exists():
            logger.info("Building the fused CPU kernels with %s", compiler)
            build(compiler, target)
        return ctypes.CDLL(str(target))
    except (OSError, subprocess.SubprocessError) as exc:
        detail = getattr(exc, "stderr", "") or exc
        logger.warning("The fused CPU kernels could not be built or loaded (%s); the CPU "
                       "step runs on torch ops.", str(detail).strip()[:500])
        return None
