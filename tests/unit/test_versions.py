"""`--version` on both console entry points, and the CLI's sampling-flag rule (one warning line, the run goes on)."""
from __future__ import annotations

from importlib.metadata import version
from pathlib import Path

import pytest

from common import cli


def test_cli_version(capsys) -> None:
    assert cli.main(["--version"]) == 0
    assert capsys.readouterr().out == f"deepseek-ocr-cli {version('deepseek-ocr')}\n"


def test_server_version(capsys) -> None:
    pytest.importorskip("sanic")
    from server.app import parse_command_line

    with pytest.raises(SystemExit) as caught:
        parse_command_line(["--version"])
    assert caught.value.code == 0
    assert capsys.readouterr().out == f"deepseek-ocr-server {version('deepseek-ocr')}\n"


def test_cli_sampling_flag_without_do_sample_warns_and_goes_on(tmp_path: Path, caplog) -> None:
    config = tmp_path / "config.toml"
    config.touch()
    # The run stops later, at the missing model folder: the warning came first, and the error is its own line.
    with caplog.at_level("WARNING", logger="deepseek_ocr.config"):
        status = cli.main(["--config", str(config), "--temperature", "0.7", "--prompt", "hi",
                           "--model-dir", str(tmp_path / "absent")], stderr=(tmp_path / "err").open("w"))
    assert status == 2
    assert [r.getMessage() for r in caplog.records] == [
        "--temperature is ignored: sampling is off (greedy decoding); add --do-sample true to sample"]


def test_cli_missing_config_is_one_error_line(tmp_path: Path) -> None:
    err = tmp_path / "err"
    with err.open("w") as handle:
        assert cli.main(["--config", str(tmp_path / "nope.toml"), "--prompt", "hi"], stderr=handle) == 2
    (line,) = err.read_text().splitlines()
    assert line.startswith("error: --config: ") and "does not exist" in line
