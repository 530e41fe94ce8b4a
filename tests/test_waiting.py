import pytest

from tests.waiting import wait_until


def test_wait_until_returns_the_value_and_fails_on_timeout() -> None:
    calls = iter([0, None, "ready"])
    assert wait_until(lambda: next(calls), 1.0) == "ready"
    with pytest.raises(AssertionError, match="the moon not reached within 0.05 s"):
        wait_until(lambda: False, 0.05, "the moon")
