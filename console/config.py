"""Console settings: a YAML file, ``BURROW_*`` environment variables and flags.

Precedence (highest first): command-line flags, environment, the config file
(``$BURROW_CONFIG_FILE`` or ``~/.config/burrow/config.yaml``), defaults.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import yaml
from pydantic import Field, ValidationError
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict


def config_file() -> Path:
    env = os.environ.get("BURROW_CONFIG_FILE")
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "burrow" / "config.yaml"


class ConfigError(Exception):
    pass


class _YamlSource(PydanticBaseSettingsSource):
    def __init__(self, settings_cls: type[BaseSettings]) -> None:
        super().__init__(settings_cls)
        path = config_file()
        self.data: dict[str, Any] = {}
        if path.is_file():
            try:
                loaded = yaml.safe_load(path.read_text()) or {}
            except (OSError, yaml.YAMLError) as exc:
                raise ConfigError(f"cannot read {path}: {str(exc).splitlines()[0]}") from None
            if not isinstance(loaded, dict):
                raise ConfigError(f"{path}: the top level must be a mapping")
            self.data = loaded

    def get_field_value(self, field, field_name: str):  # pragma: no cover - unused by __call__
        return self.data.get(field_name), field_name, False

    def __call__(self) -> dict[str, Any]:
        return {k: v for k, v in self.data.items() if k in self.settings_cls.model_fields}


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="BURROW_", extra="ignore")

    api_url: str | None = None
    api_key: str | None = None
    agent_url: str | None = None
    theme: str = "burrow-dark"
    keymap: dict[str, str] = Field(default_factory=dict)
    read_only: bool = False
    context: str | None = None  # the name shown in the header (default: the agent URL)
    cloud_poll_seconds: float = 10.0
    export_dir: Path | None = None  # where HAR files are written; see export_dir()
    animations: bool = False  # off by default: they cost frames over SSH and show nothing new

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return (init_settings, env_settings, _YamlSource(settings_cls))


def export_dir(settings: Settings) -> Path:
    """Where HAR exports go: the ``export_dir`` setting, else ``~/Downloads`` when it
    exists, else ``exports/`` in burrow's data directory (``$BURROW_DATA_DIR``,
    ``$XDG_DATA_HOME/burrow`` or ``~/.local/share/burrow``)."""
    if settings.export_dir is not None:
        return settings.export_dir.expanduser()
    downloads = Path.home() / "Downloads"
    if downloads.is_dir():
        return downloads
    from backend.cli import default_data_dir

    return default_data_dir() / "exports"


def load_settings(**flags: Any) -> Settings:
    """Settings from flags (None means 'not given'), env and file; ConfigError when bad."""
    try:
        return Settings(**{k: v for k, v in flags.items() if v is not None})
    except ValidationError as exc:
        e = exc.errors()[0]
        raise ConfigError(f"invalid setting {'.'.join(str(x) for x in e['loc'])}: {e['msg']}") from None
