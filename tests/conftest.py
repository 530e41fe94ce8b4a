"""Shared fixtures live in tests/fixtures/* (one module per simulated peer or hardware)."""

import pytest

pytest_plugins = [
    "tests.fixtures.paths",
    "tests.fixtures.idp",
    "tests.fixtures.api",
    "tests.fixtures.broker",
    "tests.fixtures.clock",
    "tests.fixtures.hardware",
    "tests.fixtures.e2e",
    "tests.fixtures.leaks",
]


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--update-golden", action="store_true", default=False,
                     help="rewrite tests/golden/*.png from the current screens")
