"""What a non-editable install ships: every package folder of the project is listed in pyproject.toml.

The test suite runs from an editable install, which imports straight from the checkout, so a subpackage missing
from `[tool.setuptools] packages` (as `common.models` once was) works in every test yet fails for a user who
installs with `pip install .` (ModuleNotFoundError on the first run).
"""
from __future__ import annotations

import sys
from pathlib import Path

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[2]


def test_every_package_folder_is_shipped() -> None:
    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["tool"]["setuptools"]["packages"])
    tops = {name.split(".")[0] for name in listed}
    found = {".".join(init.parent.relative_to(ROOT).parts)
             for top in tops for init in (ROOT / top).rglob("__init__.py") if "__pycache__" not in init.parts}
    assert found, "no packages found"
    assert found <= listed, f"missing from [tool.setuptools] packages: {sorted(found - listed)}"
