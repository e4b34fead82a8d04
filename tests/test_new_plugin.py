"""``meshd new plugin``: what it writes passes its own test and runs in ``meshd serve``."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
from pathlib import Path

from conftest import meshd
from typer.testing import CliRunner

from meshd.ops import cli


def _new(folder: Path, name: str = "meadow") -> tuple[int, str]:
    result = CliRunner().invoke(cli.app, ["new", "plugin", name, "--dir", str(folder)])
    return result.exit_code, result.output


def _files(folder: Path) -> dict[str, str]:
    return {
        str(path.relative_to(folder)): path.read_text()
        for path in sorted(folder.rglob("*"))
        if path.is_file()
    }


def test_a_new_plugin_passes_its_own_test_and_serve_runs_it(tmp_path: Path) -> None:
    code, output = _new(tmp_path)
    assert code == 0, output
    assert output.splitlines() == [
        f"wrote {tmp_path / 'plugins' / 'meadow.py'}",
        f"wrote {tmp_path / 'tests' / 'test_meadow.py'}",
        f"wrote {tmp_path / 'meshd.toml'}",
        f"next, in {tmp_path}: pytest tests/test_meadow.py, then meshd serve",
    ]
    assert set(_files(tmp_path)) == {"plugins/meadow.py", "tests/test_meadow.py", "meshd.toml"}
    # its test (meshd.testing, assert_deterministic among them) while serve runs the world
    tested = subprocess.Popen(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_meadow.py"],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    data = tmp_path / "data"
    config = str(tmp_path / "meshd.toml")
    served = meshd(
        "serve",
        "--config",
        config,
        "--data",
        str(data),
        "--listen",
        "127.0.0.1:0",
        "--rate",
        "0",
        "--ticks",
        "10",
    )
    assert "stopped at tick 10" in served.stderr
    with sqlite3.connect(data / "world.db") as db:
        kinds = dict(db.execute("SELECT kind, count(*) FROM entity GROUP BY kind").fetchall())
    assert kinds == {"sheep": 20}  # [plugins.meadow] sheep = 20
    report = tested.communicate(timeout=120)[0]
    assert tested.returncode == 0, report
    assert "3 passed" in report


def test_a_name_that_is_no_identifier_is_refused_with_exit_2(tmp_path: Path) -> None:
    for name in ("my-game", "3d", "class"):
        code, output = _new(tmp_path, name)
        assert code == 2 and "is not a Python identifier" in output
    assert _files(tmp_path) == {}


def test_an_existing_file_is_named_and_nothing_is_written(tmp_path: Path) -> None:
    mine = tmp_path / "tests" / "test_meadow.py"
    mine.parent.mkdir()
    mine.write_text("# my own test\n")
    code, output = _new(tmp_path)
    assert code == 1 and f"{mine} exists already; nothing was written" in output
    assert _files(tmp_path) == {"tests/test_meadow.py": "# my own test\n"}


def test_an_existing_config_is_kept(tmp_path: Path) -> None:
    (tmp_path / "meshd.toml").write_text('[plugins]\nload = ["tavern"]\n')
    code, output = _new(tmp_path)
    assert code == 0 and 'add "meadow" to its plugins.load' in output
    assert _files(tmp_path)["meshd.toml"] == '[plugins]\nload = ["tavern"]\n'
    assert "plugins/meadow.py" in _files(tmp_path)
