"""Temporary alias of `w8a16.io.cli` while the package moves to its new layout (removed in the same series)."""
import sys

from .io import cli as _module

sys.modules[__name__] = _module
