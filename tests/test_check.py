"""``meshd check``: each way a plugin can break determinism is caught and named."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import attrs
import pytest

from meshd.ops.check import CheckFailed, WorldSpec, check, format_report

SLOPPY = Path(__file__).resolve().parent / "fixtures" / "plugins"


def _spec(mistake: str, walkers: int = 40, **settings) -> WorldSpec:
    return WorldSpec(
        plugins=["sloppy"],
        dirs=[str(SLOPPY)],
        settings={"sloppy": {"mistake": mistake, "walkers": walkers, **settings}},
        size=60.0,
        seed=3,
        dt=0.05,
        halo=6.0,
    )


def test_a_correct_plugin_is_the_same_every_way_after_every_tick() -> None:
    # Its prints do not get in the way; its timers survive a kill, a re-layout and a restart.
    report = check(_spec("none", chatty=True, timers=True), ticks=30)
    assert report.same
    assert set(report.first_differing_tick.values()) == {None}
    assert report.findings == [] and report.causes == []
    assert format_report(report)[-1].startswith("OK")


@pytest.mark.parametrize(
    ("mistake", "way", "finding", "cause"),
    [
        ("global_random", "one worker again", "random.uniform() (the global generator)", None),
        ("clock", "one worker again", "time.time()", None),
        ("set_order", "one worker again", None, "iteration order of a set"),
        ("registry", "four workers", None, "module-level"),
        ("in_place", "four workers", "the previous walker.trail changed in place", None),
    ],
)
def test_each_mistake_is_caught_at_its_first_tick_and_named(mistake, way, finding, cause) -> None:
    report = check(_spec(mistake), ticks=20)
    assert not report.same
    difference = report.difference
    assert difference is not None and difference.tick == 1
    assert report.first_differing_tick[way] == 1
    assert difference.entities, "the differing entities are shown"
    assert all(entity["kind"] == "walker" for entity in difference.entities)
    if finding is not None:
        (what, where, count), *_ = report.findings
        assert what.startswith(finding)
        assert where.startswith("sloppy.py:") and count >= 20
    if cause is not None:
        assert any(cause in text for text in report.causes), report.causes


def test_a_restart_loses_module_level_state() -> None:
    report = check(_spec("registry"), ticks=20)
    assert report.first_differing_tick["restart"] == 11  # the first tick after the restart
    assert report.first_differing_tick["one worker again"] is None


def test_the_command_exits_1_with_a_json_report(tmp_path: Path) -> None:
    config = tmp_path / "meshd.toml"
    config.write_text(
        "[world]\nsize = 60.0\nseed = 3\nhalo = 6.0\n"
        f'[plugins]\nload = ["sloppy"]\ndirs = ["{SLOPPY}"]\n'
        '[plugins.sloppy]\nmistake = "clock"\nwalkers = 20\n'
    )
    done = subprocess.run(
        [sys.executable, "-m", "meshd", "check", "--config", str(config), "--ticks", "5", "--json"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 1, done.stderr
    report = json.loads(done.stdout)
    assert report["same"] is False and report["difference"]["tick"] == 1
    assert report["findings"][0]["what"] == "time.time()"


def test_a_plugin_that_does_not_load_is_a_clear_error(tmp_path: Path) -> None:
    config = tmp_path / "meshd.toml"
    config.write_text('[plugins]\nload = ["nowhere"]\ndirs = []\n')
    done = subprocess.run(
        [sys.executable, "-m", "meshd", "check", "--config", str(config), "--ticks", "5"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 2
    assert "nowhere" in done.stderr and "Traceback" not in done.stderr


def test_a_plugin_that_fails_to_build_its_world_is_named(tmp_path: Path) -> None:
    (tmp_path / "broken.py").write_text(
        "from meshd import Plugin\n"
        "def create_world(world):\n"
        "    raise RuntimeError('no map file')\n"
        "plugin = Plugin(name='broken', create_world=create_world)\n"
    )
    spec = attrs.evolve(_spec("none"), plugins=["broken"], dirs=[str(tmp_path)], settings={})
    with pytest.raises(CheckFailed, match=r"one worker.*RuntimeError: no map file"):
        check(spec, ticks=2)


def test_world_state_is_the_same_every_way_and_survives_a_restart() -> None:
    spec = attrs.evolve(_spec("none"), plugins=["teams"], settings={"teams": {"walkers": 30}})
    report = check(spec, ticks=30)
    assert report.same, format_report(report)
