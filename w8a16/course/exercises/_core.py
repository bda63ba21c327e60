"""The verdict machinery shared by every exercise check (see the package docstring)."""

from __future__ import annotations

import functools
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

    def _ipython_display_(self) -> None:
        """The check has already printed this verdict; a notebook showing the returned value would repeat it."""


def not_attempted(value: Any) -> bool:
    """Stubs return None (or ``...``) or raise NotImplementedError; all of them mean 'not attempted'."""
    return value is None or value is Ellipsis


def call(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """Call the learner's function; turn a stub into NotAttempted and a crash into a friendly Failed."""
    try:
        value = fn(*args, **kwargs)
    except NotImplementedError:
        raise NotAttempted from None
    except (Failed, NotAttempted):
        raise
    except Exception as err:  # the learner's bug: report it in one line, no traceback
        raise Failed(f"your function raised {type(err).__name__}: {err}") from None
    if not_attempted(value):
        raise NotAttempted
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
                print(verdict)
            return verdict

        return check

    return wrap
