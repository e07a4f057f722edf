"""The Dockerfile, checked without a Docker daemon: what it installs matches pyproject.toml and the README, it
copies every package, its entry point is the server's console script, and the command it runs is refused without
an API key and accepted with one (the server's own rule, exercised here)."""
from __future__ import annotations

import json
import re
import shlex
import sys
from pathlib import Path

import pytest

if sys.version_info >= (3, 11):
    import tomllib
else:
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[2]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) in order, continuation lines joined and comments dropped."""
    text = (ROOT / "Dockerfile").read_text(encoding="utf-8")
    logical, current = [], ""
    for line in text.splitlines():
        if not current and (not line.strip() or line.lstrip().startswith("#")):
            continue
        current += line.rstrip("\\").strip() + " "
        if not line.rstrip().endswith("\\"):
            logical.append(current.strip())
            current = ""
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1] if " " in line else "") for line in logical]


def args_of(name: str) -> list[str]:
    return [args for instruction, args in instructions() if instruction == name]


def pip_installs() -> dict[str, list[str]]:
    """{variant: pip install arguments} from the RUN that installs the package."""
    (run,) = [args for args in args_of("RUN") if "pip install" in args]
    found = dict(re.findall(r'"\$VARIANT" = "(\w+)" \]; then pip install ([^;]+);', run))
    return {variant: shlex.split(line) for variant, line in found.items()}


def readme_section(title: str) -> str:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    start = text.index(f"## {title}")
    end = text.find("\n## ", start + 1)
    return text[start:end if end > 0 else None]


def test_both_variants_install_extras_that_exist() -> None:
    installs = pip_installs()
    assert set(installs) == {"cpu", "cuda"}
    extras = set(PYPROJECT["project"]["optional-dependencies"])
    for variant, argv in installs.items():
        (target,) = [a for a in argv if a.startswith(".[")]
        wanted = set(target[2:-1].split(","))
        assert {"torch", "server"} <= wanted <= extras, (variant, wanted)
    assert installs["cpu"][:2] == ["-c", "constraints.txt"] and "-c" not in installs["cuda"]


def test_install_lines_are_the_readmes() -> None:
    unquoted = readme_section("Docker").replace("'", "").replace('"', "")
    for argv in pip_installs().values():
        assert f"pip install {' '.join(argv)}" in unquoted, argv


def test_every_package_and_install_file_is_copied() -> None:
    copied = {shlex.split(args)[0].rstrip("/") for args in args_of("COPY")} | {
        name for args in args_of("COPY") for name in shlex.split(args)[:-1]}
    for package in PYPROJECT["tool"]["setuptools"]["packages"]:
        folder = package.replace(".", "/")  # a subpackage travels inside its parent's folder
        assert any(folder == c or folder.startswith(c + "/") for c in copied), package
    for name in ("pyproject.toml", "README.md", "constraints.txt"):
        assert name in copied and (ROOT / name).is_file(), name


def test_entrypoint_is_the_server_console_script_and_the_cache_a_volume() -> None:
    (entrypoint,) = args_of("ENTRYPOINT")
    assert json.loads(entrypoint) == ["deepseek-ocr-server"]
    assert PYPROJECT["project"]["scripts"]["deepseek-ocr-server"] == "server.app:main"
    (volume,) = args_of("VOLUME")
    env = " ".join(args_of("ENV"))
    assert json.loads(volume) == ["/cache"] and "XDG_CACHE_HOME=/cache" in env and "HF_HOME=/cache/" in env


def test_the_container_command_needs_an_api_key(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("sanic")
    from common.errors import UserError
    from server.app import check_exposure, parse_command_line, resolve_api_key

    (command,) = args_of("CMD")
    argv = json.loads(command)
    assert "--insecure-no-auth" not in argv and argv[argv.index("--host") + 1] == "0.0.0.0"
    config = tmp_path / "config.toml"
    config.touch()
    settings, _ = parse_command_line(["--config", str(config), *argv])
    with pytest.raises(UserError, match="without an API key"):
        check_exposure(settings.server, resolve_api_key(settings.server, {}))
    check_exposure(settings.server, resolve_api_key(settings.server, {"DEEPSEEK_OCR_API_KEY": "sk-local"}))
