"""Register W8A16 with transformers when transformers loads its quantizers, not before.

`w8a16.io.hf` subclasses transformers' quantizer classes, and importing those costs about a second, so
``import w8a16`` must not do it. But ``from_pretrained`` on a saved W8A16 model has to find the ``"w8a16"``
method registered. transformers imports ``transformers.quantizers.auto`` before it reads any quantization
config, so a one-shot import hook on that module registers w8a16 just in time; if transformers already has it
loaded, `install` registers at once.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import sys
import warnings

_TRIGGER = "transformers.quantizers.auto"


def _register() -> None:
    try:
        importlib.import_module("w8a16.io.hf")  # registers itself
    except Exception as err:  # never break the user's transformers import over an integration
        warnings.warn(f"w8a16: could not register the 'w8a16' quantization method with transformers ({err!r}); "
                      "from_pretrained will not know W8A16 checkpoints", stacklevel=2)


class _RegisterAfterImport(importlib.abc.MetaPathFinder):
    """Finds nothing itself: for the trigger module, wraps the real loader so registration runs right after it."""

    def find_spec(self, fullname, path, target=None):
        if fullname != _TRIGGER:
            return None
        _uninstall()
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        exec_module = spec.loader.exec_module

        def exec_then_register(module):
            exec_module(module)
            _register()

        spec.loader.exec_module = exec_then_register
        return spec


_finder = _RegisterAfterImport()


def _uninstall() -> None:
    if _finder in sys.meta_path:
        sys.meta_path.remove(_finder)


def install() -> None:
    """Register now if transformers' quantizers are loaded, otherwise as soon as they are."""
    if _TRIGGER in sys.modules:
        _register()
    elif _finder not in sys.meta_path:
        sys.meta_path.insert(0, _finder)
