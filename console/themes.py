"""Console colour themes: YAML files validated by pydantic, turned into Textual themes.

Bundled themes live in the repository's ``themes/`` folder; users add their own in
``$XDG_CONFIG_HOME/burrow/themes``.  App colours (HTTP methods, status classes, the
replay marker, sparklines) are theme ``variables`` with defaults, so a theme file only
needs to name the colours it wants to change.  A broken file is reported in one line and
skipped, never raised, so a typo in a user theme can't stop the console from starting.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from rich.style import Style
from textual.app import App
from textual.color import Color, ColorParseError
from textual.theme import Theme

__all__ = [
    "BUNDLED_THEMES_DIR",
    "DEFAULT_THEME",
    "DEFAULT_VARIABLES",
    "ThemeFile",
    "load_themes",
    "register_themes",
    "user_themes_dir",
    "variable_style",
]

BUNDLED_THEMES_DIR: Path = Path(__file__).resolve().parent.parent / "themes"
"""The repository's ``themes/`` folder (found next to the package in an editable install)."""

DEFAULT_THEME = "burrow-dark"
"""The theme the console starts with when neither flag nor config names one."""

# Colour means status only: the methods are neutral greys (writes a little brighter), so
# a red or green cell is always a status, never a DELETE or a POST.
DEFAULT_VARIABLES: dict[str, str] = {
    "method-get": "#A9B1BE",
    "method-post": "#D7DAE0",
    "method-put": "#D7DAE0",
    "method-patch": "#D7DAE0",
    "method-delete": "#EEF0F4",
    "method-other": "#8A919E",
    "status-2xx": "#6CC58A",
    "status-3xx": "#56C2C9",
    "status-4xx": "#E8C15A",
    "status-5xx": "#E5676B",
    "status-pending": "#8A919E",
    "replay": "#D783C8",
    "sparkline": "#5AA9E6",
}
"""App colour variables every theme gets; a theme file's ``variables`` override them."""

_COLOR_FIELDS = (
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


def _check_color(value: str) -> str:
    """Raise ``ValueError`` unless Textual can parse ``value`` as a colour."""
    try:
        Color.parse(value)
    except ColorParseError as exc:
        raise ValueError(f"not a colour: {value!r}") from exc
    return value


class ThemeFile(BaseModel):
    """The schema of one theme file; mirrors :class:`textual.theme.Theme`."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    primary: str
    secondary: str | None = None
    accent: str | None = None
    foreground: str | None = None
    background: str | None = None
    surface: str | None = None
    panel: str | None = None
    boost: str | None = None
    warning: str | None = None
    error: str | None = None
    success: str | None = None
    dark: bool = True
    ansi: bool = False
    luminosity_spread: float = 0.15
    text_alpha: float = 0.95
    variables: dict[str, str] = Field(default_factory=dict)

    @field_validator(*_COLOR_FIELDS)
    @classmethod
    def _colour(cls, value: str | None) -> str | None:
        return None if value is None else _check_color(value)

    @field_validator("variables")
    @classmethod
    def _app_colours(cls, value: dict[str, str]) -> dict[str, str]:
        # Only the app's own variables are known to be colours; Textual's other
        # variables may be styles ("bold") or colours with alpha ("#fff 30%").
        for key in DEFAULT_VARIABLES.keys() & value.keys():
            try:
                _check_color(value[key])
            except ValueError as exc:
                raise ValueError(f"{key}: {exc}") from None
        return value

    def to_theme(self) -> Theme:
        """Build the Textual theme, with :data:`DEFAULT_VARIABLES` under the file's own."""
        fields = self.model_dump(exclude={"variables"})
        return Theme(**fields, variables={**DEFAULT_VARIABLES, **self.variables})


def _one_line(exc: ValidationError) -> str:
    """Summarise pydantic errors as ``field: problem; field: problem``."""
    parts = []
    for error in exc.errors():
        where = ".".join(str(part) for part in error["loc"]) or "theme"
        message = str(error["msg"]).removeprefix("Value error, ")
        parts.append(f"{where}: {message}")
    return "; ".join(parts)


def _load_file(path: Path) -> Theme:
    """Read one theme file; raise ``ValueError`` with a one-line reason if it is broken."""
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"cannot read: {exc}") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise ValueError(f"invalid YAML{where}: {problem}") from None
    if not isinstance(data, dict):
        raise ValueError("expected a mapping of theme fields")
    try:
        theme = ThemeFile.model_validate(data).to_theme()
    except ValidationError as exc:
        raise ValueError(_one_line(exc)) from None
    try:
        # Textual builds the colour system lazily; build it now so a bad combination
        # shows up here rather than when the user switches to the theme.
        theme.to_color_system().generate()
    except Exception as exc:
        raise ValueError(f"unusable theme: {exc}") from None
    return theme


def _theme_files(directory: Path) -> list[Path]:
    if not directory.is_dir():
        return []
    return sorted(
        path for path in directory.iterdir() if path.suffix in {".yaml", ".yml"} and path.is_file()
    )


def load_themes(dirs: Iterable[Path]) -> tuple[dict[str, Theme], list[str]]:
    """Load every ``*.yaml``/``*.yml`` theme in ``dirs``; return themes by name and errors.

    Later folders win, so a user theme named like a bundled one replaces it.  Each broken
    file yields exactly one message (``path: reason``) and is skipped; missing folders
    are ignored.
    """
    themes: dict[str, Theme] = {}
    errors: list[str] = []
    for directory in dirs:
        seen_here: dict[str, Path] = {}
        for path in _theme_files(Path(directory)):
            try:
                theme = _load_file(path)
            except ValueError as exc:
                errors.append(f"theme {path}: {exc}")
                continue
            if theme.name in seen_here:
                errors.append(
                    f"theme {path}: name {theme.name!r} already used by "
                    f"{seen_here[theme.name].name}; skipped"
                )
                continue
            seen_here[theme.name] = path
            themes[theme.name] = theme
    return themes, errors


def user_themes_dir() -> Path:
    """``$XDG_CONFIG_HOME/burrow/themes``, or ``~/.config/burrow/themes``."""
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "burrow" / "themes"


def register_themes(app: App, themes: Mapping[str, Theme]) -> None:
    """Register ``themes`` with ``app`` so ``app.theme = name`` and the palette can use them."""
    for theme in themes.values():
        app.register_theme(theme)


def variable_style(variables: Mapping[str, str], name: str) -> Style:
    """A Rich style coloured by theme variable ``name`` (e.g. ``app.theme_variables``).

    Theme colours use Textual's spelling (``ansi_red``, ``#rrggbb``), which Rich can't
    parse directly; this converts them, falling back to :data:`DEFAULT_VARIABLES` and
    then to no colour at all.
    """
    for value in (variables.get(name), DEFAULT_VARIABLES.get(name)):
        if value is None:
            continue
        try:
            return Style(color=Color.parse(value).rich_color)
        except ColorParseError:
            continue
    return Style()
