"""One frozen settings object: CLI option > DIGITWATCH_* variable > TOML file > default.

This is the only module that reads `os.environ`.
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Literal, get_args

from digitwatch.errors import ConfigError

PACKAGE_ROOT = Path(__file__).resolve().parent


def _shipped_weights(name: str = "mnist-mlp.safetensors") -> Path:
    """The shipped weights: inside the package when installed from a wheel, else the checkout's."""
    installed = PACKAGE_ROOT / "weights" / name
    return installed if installed.exists() else PACKAGE_ROOT.parent / "weights" / name


DEFAULT_WEIGHTS = _shipped_weights()

LogFormat = Literal["auto", "console", "json"]
OnSuccess = Literal["keep", "delete"]


@dataclass(frozen=True)
class Settings:
    """Every option of every command; the README's configuration table mirrors this."""

    inbox: Path = Path("inbox")
    outbox: Path = Path("outbox")
    weights: Path = DEFAULT_WEIGHTS
    data_dir: Path = Path.home() / ".cache" / "digitwatch" / "mnist"
    download: bool = True
    poll: float = 0.0  # seconds between polls; 0 = inotify events
    recursive: bool = False
    ignore: tuple[str, ...] = ()  # more file/folder name globs that are never input
    quiet_period: float = 2.0  # seconds size+mtime must hold still when completeness is unknown
    rescan_interval: float = 60.0
    batch_size: int = 64
    max_delay_ms: float = 5.0
    workers: int = 2
    fsync: bool = True
    on_success: OnSuccess = "keep"
    max_pixels: int = 40_000_000
    max_file_mb: float = 50.0
    # Memory all decodes in flight may take at once, estimated from each header
    # (codec.decode_cost). The unit's MemoryMax=1G holds the main process (~75 MB), two
    # workers before decoding (~65 MB each) and this; the ~280 MB left covers files under
    # the shared budget's threshold, file bytes in flight and the page cache
    # (tests/test_systemd_unit.py checks the sum).
    max_decode_mb: float = 600.0
    # SIGTERM: seconds to wait for the batches in the workers before leaving them claimed
    # for the next start; the whole stop then takes well under the README's 10 s and the
    # unit's TimeoutStopSec=15.
    stop_timeout: float = 5.0
    uncertain_below: float = 0.9  # from the curve in docs/calibration.md
    review: bool = True  # doubtful answers (uncertain, no_digit) also go to the review queue
    review_dir: str = ""  # "" = <outbox>/review
    metrics_file: str = ""  # Prometheus textfile, rewritten every 5 s; "" = off
    metrics_port: int = 0  # HTTP /metrics on this port; 0 = off
    log_format: LogFormat = "auto"
    log_level: str = "info"
    host: str = "127.0.0.1"  # `serve`: loopback unless asked
    port: int = 8080  # `serve`; 0 = any free port (the log says which)
    token: str = field(default="", repr=False)  # `serve`: review decisions need it; "" = off

    @property
    def review_path(self) -> Path:
        return Path(self.review_dir) if self.review_dir else self.outbox / "review"

    @property
    def max_file_bytes(self) -> int:
        return int(self.max_file_mb * 1024 * 1024)

    @property
    def max_decode_bytes(self) -> int:
        return int(self.max_decode_mb * 1024 * 1024)


_FIELDS = {f.name: f for f in fields(Settings)}
_DEFAULTS = Settings()
ENV_PREFIX = "DIGITWATCH_"


def env_name(field: str) -> str:
    return ENV_PREFIX + field.upper()


def _coerce(name: str, value: Any, source: str) -> Any:
    """Turn a string (env) or TOML value into the field's type, or raise ConfigError."""
    default = getattr(_DEFAULTS, name)
    try:
        if isinstance(default, bool):
            if isinstance(value, bool):
                return value
            text = str(value).strip().lower()
            if text in {"1", "true", "yes", "on"}:
                return True
            if text in {"0", "false", "no", "off"}:
                return False
        elif isinstance(default, Path):
            return Path(str(value)).expanduser()
        elif isinstance(default, tuple):  # a list in TOML, comma-separated in the environment
            items = value.split(",") if isinstance(value, str) else list(value)
            if all(isinstance(i, str) for i in items):
                return tuple(i.strip() for i in items if i.strip())
        elif isinstance(default, int | float) and not isinstance(value, bool):
            number = type(default)(value)
            if number >= 0:
                return number
        elif isinstance(default, str):
            return str(value)
    except (TypeError, ValueError):
        pass
    raise ConfigError(f"{source}: invalid value {value!r} for {name}")


def _choices(name: str) -> tuple[str, ...]:
    return {"log_format": get_args(LogFormat), "on_success": get_args(OnSuccess)}.get(name, ())


def _check(name: str, value: Any, source: str) -> Any:
    value = _coerce(name, value, source)
    choices = _choices(name)
    if choices and value not in choices:
        raise ConfigError(f"{source}: {name} must be one of {', '.join(choices)}, not {value!r}")
    return value


def read_config_file(path: Path) -> dict[str, Any]:
    try:
        data = tomllib.loads(path.read_text())
    except OSError as e:
        raise ConfigError(f"{path}: cannot read configuration ({e.strerror})") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: invalid TOML ({e})") from None
    table = data.get("digitwatch", data)
    out: dict[str, Any] = {}
    for key, value in table.items():
        name = key.replace("-", "_")
        if name not in _FIELDS:
            raise ConfigError(f"{path}: unknown setting {key!r}")
        out[name] = _check(name, value, str(path))
    return out


def load(
    cli: Mapping[str, Any] | None = None,
    *,
    config_file: Path | None = None,
    environ: Mapping[str, str] | None = None,
) -> Settings:
    """Merge the sources in order of precedence; `None` in `cli` means "not given"."""
    environ = os.environ if environ is None else environ
    if config_file is None and environ.get(ENV_PREFIX + "CONFIG"):
        config_file = Path(environ[ENV_PREFIX + "CONFIG"])
    values: dict[str, Any] = read_config_file(config_file) if config_file else {}
    for name in _FIELDS:
        raw = environ.get(env_name(name))
        if raw is not None and raw != "":
            values[name] = _check(name, raw, env_name(name))
    for name, value in (cli or {}).items():
        if value is None:
            continue
        if name not in _FIELDS:
            raise ConfigError(f"unknown option {name}")
        values[name] = _check(name, value, "--" + name.replace("_", "-"))
    settings = dataclasses.replace(_DEFAULTS, **values)
    if settings.batch_size < 1 or settings.workers < 1:
        raise ConfigError("batch_size and workers must be at least 1")
    if not 0.0 <= settings.uncertain_below <= 1.0:
        raise ConfigError("uncertain_below must be between 0 and 1")
    return settings


def describe() -> list[tuple[str, str, str, str]]:
    """(option, environment variable, TOML key, default) for every setting: the README table."""
    rows = []
    for name in _FIELDS:
        default = getattr(_DEFAULTS, name)
        shown = "weights/mnist-mlp.safetensors (shipped)" if name == "weights" else str(default)
        if name == "data_dir":
            shown = "~/.cache/digitwatch/mnist"
        if name == "ignore":
            shown = "none beyond the built-in list"
        if name == "token":
            shown = "off"
        rows.append(("--" + name.replace("_", "-"), env_name(name), name, shown))
    return rows
