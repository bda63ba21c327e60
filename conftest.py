"""Test-wide settings that make `pytest` give the same answers on any machine, with or without network.

The notebooks' committed outputs were made with the offline, random-weight models (`w8a16.models`): a run that
reached the hub, or found the real models in the user's cache, would load the pretrained weights and print other
numbers. So the whole run is offline and sees an empty, private Hugging Face cache. Tests of the online path
fake the hub themselves (tests/test_models.py). Set here, at import, so the notebook kernels that nbval starts
inherit it and huggingface_hub (which reads these variables once, on import) sees them.
"""

import atexit
import os
import shutil
import tempfile

_HF_HOME = tempfile.mkdtemp(prefix="w8a16-test-hf-home-")
atexit.register(shutil.rmtree, _HF_HOME, ignore_errors=True)
os.environ.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_HOME=_HF_HOME, HF_HUB_DISABLE_TELEMETRY="1")
os.environ.pop("HF_HUB_CACHE", None)  # would override HF_HOME's cache
os.environ.pop("TRANSFORMERS_CACHE", None)
