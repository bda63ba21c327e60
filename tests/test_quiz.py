"""The lesson quizzes (exercises/quiz.py): one format for every lesson, answers kept out of the notebooks."""

import importlib

import pytest

from w8a16.course.exercises._core import FAILED, NOT_ATTEMPTED, PASSED
from w8a16.course.exercises.quiz import Question, Quiz

LESSONS = ["nb01", "nb02", "nb03", "nb04", "nb05", "nb06", "nb07", "nb08", "nb09"]


@pytest.fixture(params=LESSONS)
def quiz(request) -> Quiz:
    return importlib.import_module(f"w8a16.course.exercises.{request.param}").QUIZ


def test_each_lesson_has_three_questions_and_its_right_answers_pass(quiz):
    assert len(quiz.questions) == 3
    verdicts = quiz.verdicts([q.answer for q in quiz.questions])
    assert [v.status for v in verdicts] == [PASSED] * 3


def test_every_wrong_option_gets_feedback_not_the_answer(quiz):
    for q in quiz.questions:
        for letter in "abcdefgh"[: len(q.options)]:
            if letter == q.answer:
                continue
            answers = [other.answer for other in quiz.questions]
            answers[quiz.questions.index(q)] = letter
            wrong = quiz.verdicts(answers)[quiz.questions.index(q)]
            assert wrong.status == FAILED and wrong.message.startswith(f"{letter}) —")


def test_placeholders_are_not_attempted_and_print_one_line_each(quiz, capsys):
    verdicts = quiz.check(["?", "?", "?"])
    assert [v.status for v in verdicts] == [NOT_ATTEMPTED] * 3
    assert capsys.readouterr().out.count("○") == 3


def test_odd_answers_are_reported_not_raised():
    quiz = Quiz("xx", [Question("2 + 2?", ("3", "4"), "b", "four.")])
    assert quiz.verdicts(["z"])[0].status == FAILED
    assert quiz.verdicts([" B) "])[0].status == PASSED  # case, spaces and a trailing ")" are forgiven
    assert quiz.verdicts([])[0].status == NOT_ATTEMPTED
    assert quiz.verdicts(["b", "a"])[-1].status == FAILED  # more answers than questions
    number = quiz.verdicts([2])[0]  # the option's number instead of its letter: wrong kind, not a blank
    assert number.status == FAILED and "not a letter" in number.message


def test_a_malformed_question_is_refused():
    with pytest.raises(ValueError):
        Question("?", ("only one",), "a", "")
    with pytest.raises(ValueError):
        Question("?", ("x", "y"), "c", "")
    with pytest.raises(ValueError):
        Question("?", ("x", "y"), "a", "", feedback={"a": "the right answer cannot have wrong-answer feedback"})
