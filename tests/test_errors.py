"""first_line: the one line of an exception's (or a text's) message that ptqflow puts into its own messages."""

from __future__ import annotations

from ptqflow.common.errors import failure_reason, first_line


def test_first_line_is_the_first_non_empty_line_of_the_message():
    assert first_line(ValueError("\n  bad shape (1, 2)\nTraceback line\n")) == "bad shape (1, 2)"
    assert first_line(RuntimeError("one line")) == "one line"
    assert first_line("\n\nsecond\nthird") == "second"


def test_first_line_without_a_message_is_the_type_name_for_an_exception_and_empty_for_a_text():
    assert first_line(KeyError()) == "KeyError"
    assert first_line(OSError("  \n ")) == "OSError"
    assert first_line("") == "" and first_line(" \n") == ""


def test_first_line_cuts_to_the_limit():
    assert first_line(ValueError("x" * 50 + "\nmore"), limit=10) == "x" * 10
    assert first_line("short", limit=10) == "short"
    assert first_line(TimeoutError(), limit=3) == "Tim"


def test_an_mlflow_exception_reads_the_same_as_its_message():
    from mlflow.exceptions import MlflowException

    exc = MlflowException("RESOURCE_DOES_NOT_EXIST: no run abc\nat line 2")
    assert str(exc) == exc.message
    assert first_line(exc) == "RESOURCE_DOES_NOT_EXIST: no run abc"


def test_failure_reason_is_the_type_and_first_line():
    assert failure_reason(ValueError("\nbad value\ndetail")) == "ValueError: bad value"
    assert failure_reason(ValueError()) == "ValueError: "
