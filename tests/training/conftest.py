"""Fixtures the training tests share."""

import pytest


@pytest.fixture
def launch(monkeypatch):
    """Sets launch variables (RANK=..., WORLD_SIZE=...) for one test; the session starts with none of them (see
    tests/conftest.py) and monkeypatch takes these away again."""

    def set_env(**values: str) -> None:
        for name, value in values.items():
            monkeypatch.setenv(name, value)

    return set_env
