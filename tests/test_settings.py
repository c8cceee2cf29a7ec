"""Configuration flows one way: CLI > DIGITWATCH_* > TOML file > default."""

from __future__ import annotations

from pathlib import Path

import pytest

from digitwatch import settings
from digitwatch.errors import ConfigError


def test_precedence(tmp_path: Path) -> None:
    cfg = tmp_path / "dw.toml"
    cfg.write_text('batch-size = 8\nmax_delay_ms = 9.5\npoll = 3\ninbox = "/from/file"\n')
    env = {"DIGITWATCH_BATCH_SIZE": "16", "DIGITWATCH_POLL": "4"}
    s = settings.load({"batch_size": 32, "inbox": None}, config_file=cfg, environ=env)
    assert s.batch_size == 32  # CLI beats env and file
    assert s.poll == 4.0  # env beats file
    assert s.max_delay_ms == 9.5  # file beats default
    assert s.inbox == Path("/from/file")  # None means "not given on the command line"
    assert s.workers == settings.Settings().workers  # default


def test_config_file_from_environment(tmp_path: Path) -> None:
    cfg = tmp_path / "dw.toml"
    cfg.write_text("[digitwatch]\nfsync = false\n")
    s = settings.load({}, environ={"DIGITWATCH_CONFIG": str(cfg)})
    assert s.fsync is False


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"DIGITWATCH_BATCH_SIZE": "many"}, "DIGITWATCH_BATCH_SIZE: invalid value 'many'"),
        ({"DIGITWATCH_FSYNC": "maybe"}, "DIGITWATCH_FSYNC: invalid value"),
        ({"DIGITWATCH_ON_SUCCESS": "shred"}, "on_success must be one of keep, delete"),
        ({"DIGITWATCH_POLL": "-1"}, "invalid value '-1' for poll"),
        ({"DIGITWATCH_BATCH_SIZE": "0"}, "batch_size and workers must be at least 1"),
    ],
)
def test_bad_values_are_one_line_errors(env: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        settings.load({}, environ=env)


def test_unknown_key_in_file_is_refused(tmp_path: Path) -> None:
    cfg = tmp_path / "dw.toml"
    cfg.write_text("batchsize = 8\n")
    with pytest.raises(ConfigError, match="unknown setting 'batchsize'"):
        settings.load({}, config_file=cfg, environ={})


def test_settings_are_frozen() -> None:
    s = settings.load({}, environ={})
    with pytest.raises(AttributeError):
        s.batch_size = 2  # type: ignore[misc]


def test_readme_configuration_table_lists_every_setting() -> None:
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    for option, env, _key, _default in settings.describe():
        assert f"`{option}`" in readme, option
        assert f"`{env}`" in readme, env


def test_ignore_globs_from_every_source(tmp_path: Path) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text('ignore = ["*.raw", "scratch"]\n')
    assert settings.load(config_file=cfg, environ={}).ignore == ("*.raw", "scratch")
    env = {"DIGITWATCH_IGNORE": "*.raw, *.heic ,"}
    assert settings.load(environ=env).ignore == ("*.raw", "*.heic")
    assert settings.load({"ignore": ("*.x",)}, environ=env).ignore == ("*.x",)
    cfg.write_text("ignore = [1]\n")
    with pytest.raises(ConfigError):
        settings.load(config_file=cfg, environ={})
