"""Where Deepseek keeps what it builds once per machine: ``$DEEPSEEK_CACHE_DIR``,
default ``~/.cache/deepseek`` (built C kernels, Triton kernels, autotuning choices,
captured graphs)."""

from __future__ import annotations

import os


def cache_root() -> str:
    return os.environ.get("DEEPSEEK_CACHE_DIR",
                          os.path.join(os.path.expanduser("~"), ".cache", "deepseek"))
