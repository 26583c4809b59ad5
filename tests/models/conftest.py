"""The model tests run on one intra-op thread (see the ``one_thread`` fixture in tests/conftest.py)."""
import pytest


@pytest.fixture(autouse=True, scope="module")
def _models_on_one_thread(one_thread):
    yield
