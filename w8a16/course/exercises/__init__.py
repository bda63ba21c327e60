"""Self-checking exercises for the notebooks.

Each notebook ``NN`` has a module ``nbNN`` with one check per exercise. A check runs the learner's function
against the reference on several inputs (edge cases included) and prints a one-line verdict:

    ✓ Per-channel scales: correct on 5 test inputs.
    ✗ Per-channel scales: ... what is wrong, and a hint.
    ○ Per-channel scales: not attempted yet.

It never lets a stack trace reach the learner and never stops the notebook. The machinery lives in
`_core.py`; a check module only writes the test cases and the hints.
"""

from ._core import Failed, Verdict, exercise, not_attempted

__all__ = ["Failed", "Verdict", "exercise", "not_attempted"]
