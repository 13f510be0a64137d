"""Multi-process tests: every test here carries the `multihost` marker (`pytest -m multihost`)."""

from pathlib import Path

import pytest

HERE = Path(__file__).parent


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Marks every test collected from this folder `multihost`."""
    for item in items:
        if HERE in item.path.parents:
            item.add_marker(pytest.mark.multihost)
