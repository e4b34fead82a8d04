"""Configuration precedence and error messages."""

from __future__ import annotations

from pathlib import Path

import pytest

from meshd.common.config import ConfigError, load_config
from meshd.mesh.plugins import load_plugin_set

REPO = Path(__file__).resolve().parent.parent


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "meshd.toml"
    path.write_text(text)
    return path


def test_flags_beat_environment_beat_file(tmp_path: Path) -> None:
    path = write(tmp_path, "[world]\nseed = 1\nsize = 300.0\n[tick]\nrate = 5.0\n")
    config = load_config(
        path,
        environ={
            "MESHD_WORLD_SEED": "2",
            "MESHD_TICK_RATE": "9",
            "MESHD_DATA_DIR": "/srv/w",
            "MESHD_CONFIG": "read by the command line",
            "OTHER_THING": "x",
        },
        overrides={"world.seed": 3, "tick.rate": None},
    )
    assert config.world.seed == 3  # flag
    assert config.tick.rate == 9.0  # environment
    assert config.world.size == 300.0  # file
    assert config.data_dir == Path("/srv/w")
    assert config.mesh.workers == 2  # default


def test_a_relative_data_folder_is_beside_the_config_file(tmp_path: Path, monkeypatch) -> None:
    folder = tmp_path / "game"
    folder.mkdir()
    monkeypatch.chdir(tmp_path)
    assert load_config(write(folder, ""), environ={}).data_dir == folder / "data"
    named = load_config(write(folder, '[data]\ndir = "worlds/one"\n'), environ={})
    assert named.data_dir == folder / "worlds" / "one"
    from_flag = load_config(write(folder, ""), environ={}, overrides={"data.dir": "here"})
    assert from_flag.data_dir == Path("here")  # a flag's or variable's: from where meshd runs


def test_tls_files_are_beside_the_config_file_and_come_in_pairs(tmp_path: Path) -> None:
    folder = tmp_path / "game"
    folder.mkdir()
    text = '[gateway]\ntls_cert = "tls/chain.pem"\ntls_key = "/etc/meshd/key.pem"\n'
    gateway = load_config(write(folder, text), environ={}).gateway
    assert gateway.tls_cert == str(folder / "tls" / "chain.pem")
    assert gateway.tls_key == "/etc/meshd/key.pem"
    with pytest.raises(ConfigError, match=r"gateway\.tls_key: expected a key file"):
        load_config(write(folder, '[gateway]\ntls_cert = "chain.pem"\n'), environ={})
    with pytest.raises(ConfigError, match=r"gateway\.tls_key: expected a key file"):
        load_config(write(folder, ""), environ={"MESHD_GATEWAY_TLS_KEY": "key.pem"})


def test_plugin_tables_become_plugin_settings(tmp_path: Path) -> None:
    path = write(tmp_path, '[plugins]\nload = ["tavern"]\n[plugins.tavern]\nnpcs = 12\n')
    config = load_config(path, environ={})
    assert config.plugins.settings == {"tavern": {"npcs": 12}}
    assert config.plugin_dirs == [(tmp_path / "plugins").resolve()]


def test_plugin_settings_come_from_the_environment_too(tmp_path: Path) -> None:
    path = write(tmp_path, '[plugins]\nload = ["tavern", "my_game"]\n[plugins.tavern]\nnpcs = 12\n')
    config = load_config(
        path,
        environ={
            "MESHD_PLUGINS_TAVERN_NPCS": "5",
            "MESHD_PLUGINS_TAVERN_THROW_CHANCE": "0.5",
            "MESHD_PLUGINS_MY_GAME_MODE": "hard",
        },
    )
    assert config.plugins.settings == {
        "tavern": {"npcs": 5, "throw_chance": 0.5},
        "my_game": {"mode": "hard"},
    }


@pytest.mark.parametrize(
    ("variable", "expected"),
    [
        ("MESHD_WORLD_SED", "MESHD_WORLD_SED names no setting; did you mean MESHD_WORLD_SEED?"),
        ("MESHD_NOTHING_LIKE_IT", "MESHD_NOTHING_LIKE_IT names no setting"),
        ("MESHD_PLUGINS_SPACE_SHIPS", "MESHD_PLUGINS_SPACE_SHIPS names no loaded plugin"),
    ],
)
def test_a_misspelt_environment_variable_is_an_error(variable: str, expected: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load_config(None, search_default=False, environ={variable: "9"})
    assert expected in str(caught.value)


def test_the_shipped_config_is_valid() -> None:
    config = load_config(REPO / "meshd.toml", environ={})
    assert config.plugins.load == ["tavern"]
    assert load_plugin_set(config).kinds.keys() == {"patron", "bottle", "mug", "player"}
    for example in ("space", "rush"):
        load_plugin_set(load_config(REPO / "examples" / f"{example}.toml", environ={}))


@pytest.mark.parametrize(
    ("text", "environ", "expected"),
    [
        ("[world]\nsize = -1.0\n", {}, "world.size: expected a size in metres > 0"),
        ("[world]\nseed = 'x'\n", {}, "world.seed"),
        ("[mesh]\ngrid = 3\n", {}, "mesh.grid: expected a power of two"),
        ("[tick]\npersist_every = 0\n", {}, "tick.persist_every"),
        ("[world]\nsizee = 1.0\n", {}, "extra fields found (sizee)"),
        ("[data]\nsynchronous = 'sometimes'\n", {}, "data.synchronous"),
        ("", {"MESHD_TICK_RATE": "-3"}, "tick.rate: expected ticks per second >= 0"),
        ("", {"MESHD_MESH_WORKERS": "zero"}, "mesh.workers"),
        ("[world\n", {}, "not valid TOML"),
    ],
)
def test_bad_values_name_the_key(tmp_path: Path, text: str, environ: dict, expected: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load_config(write(tmp_path, text), environ=environ)
    assert expected in str(caught.value)


def test_missing_config_file_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "absent.toml", environ={})


def test_the_benchmarks_find_the_example_plugins(tmp_path: Path) -> None:
    from meshd.ops.bench import _tavern_config

    assert "patron" in load_plugin_set(_tavern_config(tmp_path)).kinds


def test_the_signup_policy_and_the_admin_group_are_checked(tmp_path: Path) -> None:
    path = write(tmp_path, "")
    config = load_config(path, environ={"MESHD_ADMIN_GROUP": "meshd-ops"})
    assert config.admin.group == "meshd-ops"
    assert (config.gateway.signup, config.gateway.signup_per_address) == ("open", 3)
    assert config.gateway.signup_trusted == ["127.0.0.1", "::1"]
    with pytest.raises(ConfigError, match=r"gateway\.signup: "):
        load_config(path, environ={"MESHD_GATEWAY_SIGNUP": "maybe"})
    with pytest.raises(ConfigError) as bad:
        load_config(
            write(
                tmp_path,
                '[gateway]\nsignup_per_minute = 0\nsignup_trusted = ["127.0.0.1", "localhost"]\n',
            ),
            environ={},
        )
    assert str(bad.value) == (
        "bad config: gateway.signup_per_minute: expected new names a minute >= 1, got 0; "
        "gateway.signup_trusted: expected a list of IP addresses, got 'localhost'"
    )
