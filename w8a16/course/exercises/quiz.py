"""A three-question self-check for the end of a lesson, in the same ✓ / ✗ / ○ format as the exercise checks.

A lesson's check module holds its quiz (``QUIZ = Quiz("07", [Question(...), ...])``) so the answers are not in
the notebook the learner reads. In the notebook::

    nb07.QUIZ.show()                        # the questions, with lettered options
    nb07.QUIZ.check(["?", "?", "?"])        # one letter per question: "a", "b", …

An answer left as "?" (or None) is "not attempted"; a wrong letter gets the feedback written for that option
(or the question's general hint); a right one gets the explanation. Nothing raises, so the notebook runs on.
"""

from __future__ import annotations

import textwrap
from dataclasses import dataclass, field
from typing import Sequence

from ._core import FAILED, NOT_ATTEMPTED, PASSED, Verdict

__all__ = ["Question", "Quiz"]

_LETTERS = "abcdefgh"
_WIDTH = 100  # about what JupyterLab shows of an output line at 1280 px with the file browser open


@dataclass(frozen=True)
class Question:
    """One multiple-choice question: ``answer`` is the letter of the right option; ``why`` explains it."""

    text: str
    options: tuple[str, ...]
    answer: str
    why: str
    feedback: dict[str, str] = field(default_factory=dict)  # letter of a wrong option -> what that choice misses
    hint: str = "not quite — reread the section this question is about."

    def __post_init__(self) -> None:
        if not 2 <= len(self.options) <= len(_LETTERS):
            raise ValueError(f"{len(self.options)} options: a question has 2–{len(_LETTERS)}")
        letters = _LETTERS[: len(self.options)]
        if self.answer not in letters or any(k not in letters or k == self.answer for k in self.feedback):
            raise ValueError(f"answer {self.answer!r} / feedback {sorted(self.feedback)} must be wrong options in {letters!r}")


@dataclass(frozen=True)
class Quiz:
    """The quiz of one lesson (``lesson`` is its number, e.g. "07")."""

    lesson: str
    questions: tuple[Question, ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "questions", tuple(self.questions))

    def show(self) -> None:
        """Print the questions and their lettered options."""
        # Wrapped at word boundaries: JupyterLab breaks a long output line wherever the window ends, mid-word.
        for n, q in enumerate(self.questions, 1):
            print(textwrap.fill(f"Q{n}. {q.text}", _WIDTH, subsequent_indent="    ", break_on_hyphens=False))
            for letter, option in zip(_LETTERS, q.options):
                print(textwrap.fill(f"    {letter}) {option}", _WIDTH, subsequent_indent="       ",
                                    break_on_hyphens=False))

    def verdicts(self, answers: Sequence[object]) -> list[Verdict]:
        """One verdict per question, without printing."""
        answers = list(answers) if isinstance(answers, (list, tuple)) else [answers]
        answers += [None] * (len(self.questions) - len(answers))
        out = []
        for n, (q, given) in enumerate(zip(self.questions, answers), 1):
            title = f"Quiz {self.lesson}, Q{n}"
            letter = given.strip().lower().rstrip(")") if isinstance(given, str) else None
            valid = _LETTERS[: len(q.options)]
            if given is not None and not isinstance(given, str):  # 2, True, ["b"]: not a blank, a wrong kind
                out.append(Verdict(title, FAILED, f"{given!r} is not a letter: answer with one of "
                                                  f"{', '.join(repr(v) for v in valid)}, in quotes."))
            elif letter in (None, "", "?"):
                out.append(Verdict(title, NOT_ATTEMPTED, 'not answered yet — put a letter in place of "?".'))
            elif letter not in valid:
                out.append(Verdict(title, FAILED, f"{given!r} is not an option: answer with one of {', '.join(valid)}."))
            elif letter == q.answer:
                out.append(Verdict(title, PASSED, f"{letter}) is right. {q.why}"))
            else:
                out.append(Verdict(title, FAILED, f"{letter}) — {q.feedback.get(letter, q.hint)}"))
        if len(answers) > len(self.questions):
            out.append(Verdict(f"Quiz {self.lesson}", FAILED,
                               f"{len(answers)} answers for {len(self.questions)} questions: give one letter per question."))
        return out

    def check(self, answers: Sequence[object]) -> list[Verdict]:
        """Print one ✓ / ✗ / ○ line per question and return the verdicts."""
        out = self.verdicts(answers)
        for v in out:
            print(v.wrapped(_WIDTH))
        return _Quiet(out)


class _Quiet(list):
    """The verdicts, without a repeated display in a notebook (they were printed)."""

    def _ipython_display_(self) -> None:
        pass
