"""course.notebook.setup: what every notebook's first cell calls must leave nothing on stderr (nbval compares it)."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# A machine without a C compiler: the package's one informational warning must not reach a notebook's stderr.
NO_COMPILER = """
import torch
from w8a16.course.notebook import setup
from w8a16 import W8A16LinearLayer, backend_info
setup(seed=0)
layer = W8A16LinearLayer(64, 32)
layer(torch.randn(1, 64))
assert not backend_info()["native"]["available"], backend_info()["native"]
print("ok")
"""


def test_setup_silences_the_missing_kernel_warning(tmp_path):
    env = {"PATH": "/usr/bin:/bin", "CC": "false", "TMPDIR": str(tmp_path), "HOME": str(tmp_path)}
    done = subprocess.run([sys.executable, "-c", NO_COMPILER], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300, check=False)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr
    assert done.stderr == ""


def test_without_setup_the_warning_is_there_once(tmp_path):
    env = {"PATH": "/usr/bin:/bin", "CC": "false", "TMPDIR": str(tmp_path), "HOME": str(tmp_path)}
    twice = "layer(torch.randn(1, 64)); layer(torch.randn(1, 64))"
    code = NO_COMPILER.replace("setup(seed=0)\n", "").replace("layer(torch.randn(1, 64))", twice)
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300, check=False)
    assert done.returncode == 0, done.stderr
    assert done.stderr.count("fast CPU kernel is not available") == 1, done.stderr
