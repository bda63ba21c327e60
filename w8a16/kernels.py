"""Temporary alias of `w8a16.ops` while the package moves to its new layout (removed in the same series)."""
from .ops import *  # noqa: F401,F403
from .ops.cpu import *  # noqa: F401,F403
from .ops.dispatch import *  # noqa: F401,F403
from .ops.dispatch import _IMPLS  # noqa: F401
from .ops.reference import reference_linear  # noqa: F401
from .ops import gpu  # noqa: F401
