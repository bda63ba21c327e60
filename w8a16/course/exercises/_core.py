"""The verdict machinery shared by every exercise check (see the package docstring)."""

from __future__ import annotations

import functools
import textwrap
from dataclasses import dataclass
from typing import Any, Callable, TypeVar

F = TypeVar("F", bound=Callable[..., Any])

PASSED, FAILED, NOT_ATTEMPTED = "passed", "failed", "not attempted"
_MARK = {PASSED: "✓", FAILED: "✗", NOT_ATTEMPTED: "○"}


class Failed(Exception):
    """Raised inside a check to fail it; its message is what the learner reads (say what and hint why)."""


class NotAttempted(Exception):
    """Raised inside a check when the learner's code is still the stub."""


@dataclass(frozen=True)
class Verdict:
    """The outcome of one check. Truthy only when it passed, so tests can ``assert check(fn)``."""

    title: str
    status: str
    message: str

    def __bool__(self) -> bool:
        return self.status == PASSED

    def __str__(self) -> str:
        return f"{_MARK[self.status]} {self.title}: {self.message}"

    __repr__ = __str__

    def wrapped(self, width: int = 100) -> str:
        """What a check prints: ``str(self)`` wrapped at word boundaries (JupyterLab breaks long lines mid-word)."""
        return textwrap.fill(str(self), width, subsequent_indent="  ", break_long_words=False, break_on_hyphens=False)

    def _ipython_display_(self) -> None:
        """The check has already printed this verdict; a notebook showing the returned value would repeat it."""


def not_attempted(value: Any) -> bool:
    """Only ``...`` returned on purpose still reads as a stub; ``None`` is a function that forgot ``return``."""
    return value is Ellipsis


FORGOT_RETURN = (
    "your function returned None — did you forget `return`? A function that computes a value and does not "
    "return it gives None to its caller."
)

# (what the error message says, the hint): crashes whose cause is almost always the same beginner's mistake.
_CRASH_HINTS: list[tuple[tuple[str, ...], str]] = [
    (
        ("torch.return_types",),
        "`.max(dim=...)` (and `.min(dim=...)`) returns a pair (values, indices), not a tensor: use "
        "`.max(dim=...).values`, or `.amax(dim=...)`, which returns only the values.",
    ),
    (
        ("only one element tensors can be converted", "cannot be converted to Scalar", "must be real number, not Tensor"),
        "a function made for one Python number (math.sqrt, math.log, float(), …) was given a whole tensor: use "
        "the torch version (torch.sqrt, torch.log, …), which works element by element.",
    ),
    (
        ("argument 'input' (position 1) must be Tensor, not",),
        "a torch function (torch.sqrt, torch.round, …) was given a plain Python number: wrap it with "
        "torch.tensor(...), or use math.sqrt / ** 0.5 for a number.",
    ),
]


def crash_hint(message: str) -> str:
    """The hint for a crash message, or '' when it is not a known beginner's mistake."""
    for needles, hint in _CRASH_HINTS:
        if any(needle in message for needle in needles):
            return " " + hint
    return ""


def returned_pair_hint(value: Any) -> str | None:
    """The hint for returning ``w.max(dim=...)`` itself: a (values, indices) named tuple, not a tensor."""
    if isinstance(value, tuple) and hasattr(value, "values") and hasattr(value, "indices"):
        return (
            f"your function returned a {type(value).__name__} (values, indices) pair: `.max(dim=...)` returns "
            "both the maxima and where they are. Use `.max(dim=...).values`, or `.amax(dim=...)`, which "
            "returns only the values."
        )
    return None


def call(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """Call the learner's function; turn a stub into NotAttempted and a crash into a friendly Failed.

    Only the untouched stub (it raises NotImplementedError) is "not attempted". ``None`` means the body ran
    and forgot ``return``; a ``.max(dim=...)`` pair, a ``math.*`` call on a tensor and a ``torch.*`` call on a
    number get a hint of their own, whatever the exercise.
    """
    try:
        value = fn(*args, **kwargs)
    except NotImplementedError:
        raise NotAttempted from None
    except (Failed, NotAttempted):
        raise
    except Exception as err:  # the learner's bug: report it in one line, no traceback
        detail = f": {err}" if str(err) else "."  # MemoryError() and friends carry no message
        raise Failed(f"your function raised {type(err).__name__}{detail}{crash_hint(str(err))}") from None
    if value is None:
        raise Failed(FORGOT_RETURN)
    if not_attempted(value):
        raise NotAttempted
    pair = returned_pair_hint(value)
    if pair:
        raise Failed(pair)
    return value


def exercise(title: str, passed: str = "correct.") -> Callable[[F], Callable[..., Verdict]]:
    """Decorate a check body ``body(learner_fn, ...)``: run it, print and return a `Verdict`.

    The body calls the learner's code through `call` and raises `Failed("what is wrong — hint")` on a
    wrong answer. Returning a string replaces the default ``passed`` message.
    """

    def wrap(body: F) -> Callable[..., Verdict]:
        @functools.wraps(body)
        def check(*args: Any, quiet: bool = False, **kwargs: Any) -> Verdict:
            try:
                message = body(*args, **kwargs)
                verdict = Verdict(title, PASSED, message if isinstance(message, str) else passed)
            except NotAttempted:
                verdict = Verdict(title, NOT_ATTEMPTED, "not attempted yet — replace the stub with your code.")
            except Failed as err:
                verdict = Verdict(title, FAILED, str(err))
            except Exception as err:  # a bug in the check itself must not stop the notebook either
                verdict = Verdict(title, FAILED, f"the check could not run ({type(err).__name__}: {err})")
            if not quiet:
                print(verdict.wrapped())
            return verdict

        return check

    return wrap
