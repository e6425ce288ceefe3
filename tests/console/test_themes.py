"""Theme files: bundled themes load and register, broken files are reported, not raised."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import yaml
from rich.color import ColorType
from textual.app import App
from textual.color import Color

from console.themes import (
    BUNDLED_THEMES_DIR,
    DEFAULT_THEME,
    DEFAULT_VARIABLES,
    load_themes,
    register_themes,
    user_themes_dir,
    variable_style,
)

BUNDLED_NAMES = {"burrow-dark", "burrow-light", "burrow-16"}
COLOUR_FIELDS = (
    "primary",
    "secondary",
    "accent",
    "foreground",
    "background",
    "surface",
    "panel",
    "boost",
    "warning",
    "error",
    "success",
)


def test_bundled_themes_load_without_errors() -> None:
    themes, errors = load_themes([BUNDLED_THEMES_DIR])
    assert errors == []
    assert themes.keys() >= BUNDLED_NAMES
    assert DEFAULT_THEME in themes
    assert themes["burrow-light"].dark is False
    assert themes["burrow-dark"].dark is True


async def test_bundled_themes_register_and_apply_on_a_real_app() -> None:
    themes, _ = load_themes([BUNDLED_THEMES_DIR])
    app = App()
    async with app.run_test() as pilot:
        register_themes(app, themes)
        for name in sorted(themes):
            app.theme = name
            await pilot.pause()
            assert app.current_theme.name == name
            # App colours reach the CSS variables, so widgets can use `$method-get`.
            for key in DEFAULT_VARIABLES:
                assert key in app.theme_variables, (name, key)


def test_every_app_variable_is_set_and_parses_in_every_bundled_theme() -> None:
    themes, _ = load_themes([BUNDLED_THEMES_DIR])
    for theme in themes.values():
        for key in DEFAULT_VARIABLES:
            Color.parse(theme.variables[key])


def test_sixteen_colour_theme_uses_only_ansi_colours() -> None:
    raw = yaml.safe_load((BUNDLED_THEMES_DIR / "burrow-16.yaml").read_text())
    themes, _ = load_themes([BUNDLED_THEMES_DIR])
    theme = themes["burrow-16"]
    assert theme.dark is True
    assert theme.ansi is True
    values = [getattr(theme, field) for field in COLOUR_FIELDS]
    values += list(raw["variables"].values())
    values += [theme.variables[key] for key in DEFAULT_VARIABLES]
    for value in values:
        assert value is not None
        assert value.startswith("ansi_"), value
        assert Color.parse(value).ansi is not None, value


def test_sixteen_colour_theme_renders_with_ansi_colours_only() -> None:
    themes, _ = load_themes([BUNDLED_THEMES_DIR])
    generated = themes["burrow-16"].to_color_system().generate()
    for name in ("primary", "error", "success", "warning", "accent"):
        assert Color.parse(generated[name]).ansi is not None, name


def _copy_bundled(tmp_path: Path) -> Path:
    directory = tmp_path / "themes"
    shutil.copytree(BUNDLED_THEMES_DIR, directory)
    return directory


def test_broken_yaml_gives_one_message_and_others_still_load(tmp_path: Path) -> None:
    directory = _copy_bundled(tmp_path)
    (directory / "broken.yaml").write_text("name: broken\nprimary: [unclosed\n")
    themes, errors = load_themes([directory])
    assert len(errors) == 1
    assert "broken.yaml" in errors[0] and "invalid YAML" in errors[0]
    assert "\n" not in errors[0]
    assert themes.keys() >= BUNDLED_NAMES


def test_schema_invalid_file_gives_one_message_and_others_still_load(tmp_path: Path) -> None:
    directory = _copy_bundled(tmp_path)
    (directory / "invalid.yaml").write_text(
        "name: invalid\nprimary: not-a-colour\ndark: maybe\nsparkles: true\n"
    )
    themes, errors = load_themes([directory])
    assert len(errors) == 1
    message = errors[0]
    assert "invalid.yaml" in message
    assert "primary" in message and "dark" in message and "sparkles" in message
    assert "\n" not in message
    assert "invalid" not in themes
    assert themes.keys() >= BUNDLED_NAMES


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("", "mapping"),
        ("- a list\n", "mapping"),
        ("name: x\n", "primary"),
        ("name: has space\nprimary: red\n", "name"),
        ("name: x\nprimary: red\nvariables:\n  method-get: nope\n", "method-get"),
    ],
)
def test_other_broken_files_are_reported(tmp_path: Path, text: str, reason: str) -> None:
    (tmp_path / "bad.yaml").write_text(text)
    themes, errors = load_themes([tmp_path])
    assert themes == {}
    assert len(errors) == 1 and reason in errors[0]


def test_variables_default_and_user_values_win(tmp_path: Path) -> None:
    (tmp_path / "mine.yml").write_text(
        "name: mine\nprimary: '#336699'\nvariables:\n"
        "  method-get: '#112233'\n  footer-key-foreground: '#445566'\n"
    )
    themes, errors = load_themes([tmp_path])
    assert errors == []
    variables = themes["mine"].variables
    assert variables["method-get"] == "#112233"
    assert variables["footer-key-foreground"] == "#445566"
    for key, value in DEFAULT_VARIABLES.items():
        if key != "method-get":
            assert variables[key] == value


def test_later_dirs_override_and_missing_dirs_are_ignored(tmp_path: Path) -> None:
    (tmp_path / "dark.yaml").write_text("name: burrow-dark\nprimary: '#ff0000'\n")
    themes, errors = load_themes([BUNDLED_THEMES_DIR, tmp_path / "absent", tmp_path])
    assert errors == []
    assert themes["burrow-dark"].primary == "#ff0000"


def test_duplicate_name_in_one_dir_is_reported(tmp_path: Path) -> None:
    (tmp_path / "a.yaml").write_text("name: same\nprimary: red\n")
    (tmp_path / "b.yaml").write_text("name: same\nprimary: blue\n")
    themes, errors = load_themes([tmp_path])
    assert themes["same"].primary == "red"
    assert len(errors) == 1 and "b.yaml" in errors[0]


def test_user_themes_dir_follows_xdg(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path))
    assert user_themes_dir() == tmp_path / "burrow" / "themes"
    monkeypatch.delenv("XDG_CONFIG_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert user_themes_dir() == tmp_path / "home" / ".config" / "burrow" / "themes"


def test_variable_style_converts_textual_colours_for_rich() -> None:
    ansi = variable_style({"status-5xx": "ansi_red"}, "status-5xx")
    assert ansi.color is not None and ansi.color.type == ColorType.STANDARD
    assert ansi.color.number == 1
    hex_style = variable_style({"status-2xx": "#00ff00"}, "status-2xx")
    assert hex_style.color is not None and hex_style.color.triplet == (0, 255, 0)
    fallback = variable_style({"replay": "garbage"}, "replay")
    assert fallback.color is not None
    assert fallback.color.triplet == Color.parse(DEFAULT_VARIABLES["replay"]).rich_color.triplet
    assert variable_style({}, "unknown").color is None


NEUTRAL_ANSI = {"ansi_default", "ansi_white", "ansi_bright_white", "ansi_black", "ansi_bright_black"}
METHODS = ("method-get", "method-post", "method-put", "method-patch", "method-delete", "method-other")
STATUSES = ("status-2xx", "status-3xx", "status-4xx", "status-5xx")


@pytest.mark.parametrize("name", [*sorted(BUNDLED_NAMES), "defaults"])
def test_colour_means_status_only(name: str) -> None:
    """Methods are neutral tones: a DELETE is not the red of a 5xx, a POST not the green of a 2xx."""
    if name == "defaults":
        variables = dict(DEFAULT_VARIABLES)
    else:
        themes, _ = load_themes([BUNDLED_THEMES_DIR])
        variables = {**DEFAULT_VARIABLES, **themes[name].variables}
    statuses = {variables[s] for s in STATUSES}
    for key in METHODS:
        value = variables[key]
        assert value not in statuses, (name, key, value)
        if value.startswith("ansi_"):
            assert value in NEUTRAL_ANSI, (name, key, value)
        else:
            c = Color.parse(value)
            chroma = (max(c.r, c.g, c.b) - min(c.r, c.g, c.b)) / 255  # 0 = grey
            assert chroma < 0.12, (name, key, value)
