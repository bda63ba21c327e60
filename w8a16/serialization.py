"""Temporary alias of `w8a16.io.serialization` while the package moves to its new layout (removed in the same series)."""
import sys

from .io import serialization as _module

sys.modules[__name__] = _module
