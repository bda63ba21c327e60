"""Self-checking exercises for the notebooks.

Each notebook ``NN`` has a module ``nbNN`` with one check per exercise. A check runs the learner's function
against the reference on several inputs (edge cases included) and prints a one-line verdict:

    ✓ Per-channel scales: correct on 5 test inputs.
    ✗ Per-channel scales: ... what is wrong, and a hint.
    ○ Per-channel scales: not attempted yet.

It never lets a stack trace reach the learner and never stops the notebook. The machinery lives in
`_core.py`; a check module only writes the test cases and the hints. Only the untouched stub (it raises
NotImplementedError) is "not attempted"; a function that returns None is told it forgot `return`.

Each lesson's module also holds its three-question quiz, ``nbNN.QUIZ`` (`quiz.py`): ``nbNN.QUIZ.show()`` prints
the questions, ``nbNN.QUIZ.check(["a", "c", "b"])`` prints one ✓ / ✗ / ○ line per answer.
"""

from ._core import Failed, Verdict, exercise, not_attempted
from .quiz import Question, Quiz

__all__ = ["Failed", "Question", "Quiz", "Verdict", "exercise", "not_attempted"]
