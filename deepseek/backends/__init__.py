"""Backends behind the HAL; a new accelerator is one plug-in (see docs/writing-a-backend.md)."""

from deepseek.backends.hal import (Backend, Capabilities, available_backends, get_backend,
                                   register_backend)

__all__ = ["Backend", "Capabilities", "available_backends", "get_backend", "register_backend"]
