"""Temporary alias of `w8a16.ops.gpu` while the package moves to its new layout (removed in the same series)."""
import sys

from .ops import gpu as _gpu

sys.modules[__name__] = _gpu
