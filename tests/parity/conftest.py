"""Every parity test is in the slow lane: it runs real-layout models against golden data or a live reference.
The fast lane (`pytest -m "not slow"`) leaves this whole folder out, models added later included."""
from __future__ import annotations

from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if HERE in Path(str(item.fspath)).resolve().parents:
            item.add_marker(pytest.mark.slow)
