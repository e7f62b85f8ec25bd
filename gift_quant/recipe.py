"""Recipes: YAML files mapped onto the frozen dataclasses of :mod:`gift_quant.config`.

A recipe has one section per stage (``model``, ``calib``, ``saliency``, ``quant``, ``train``,
``export``, ``eval``). Keys equal the dataclass fields; an unknown key is an error that names the
closest valid key. ``--set section.key=value`` overrides are parsed as YAML scalars and checked
against the field's type.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from pathlib import Path
from typing import Any

import yaml

from gift_quant.config import (  # noqa: F401  (re-exported: the recipe API in one place)
    BUDGET_KEYS,
    SALIENCY_PRESETS,
    SUPPORTED_BITS,
    CalibConfig,
    EvalConfig,
    ExportConfig,
    ModelConfig,
    QuantConfig,
    Recipe,
    RecipeError,
    SaliencyConfig,
    TrainConfig,
    check_windows,
)

__all__ = [
    "CalibConfig",
    "EvalConfig",
    "ExportConfig",
    "ModelConfig",
    "QuantConfig",
    "Recipe",
    "RecipeError",
    "SaliencyConfig",
    "TrainConfig",
    "check_windows",
    "find_recipe",
    "load_recipe",
    "recipe_from_dict",
]


def _shipped_recipes():
    """recipes/ of a source checkout, or the copy a wheel installs as gift_quant.recipes."""
    checkout = Path(__file__).resolve().parent.parent / "recipes"
    if checkout.is_dir():
        return checkout
    from importlib import resources

    return resources.files("gift_quant.recipes")


def find_recipe(name: str | Path) -> Path:
    """A recipe file: an existing path, or the name of a shipped recipe (``quickstart``)."""
    path = Path(name)
    if path.is_file():
        return path
    shipped = _shipped_recipes()
    stem = path.name.removesuffix(".yaml")
    candidate = shipped / f"{stem}.yaml"
    if candidate.is_file():
        return Path(str(candidate))
    names = sorted(
        p.name.removesuffix(".yaml") for p in shipped.iterdir() if p.name.endswith(".yaml")
    )
    close = difflib.get_close_matches(stem, names, n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    raise RecipeError(
        f"recipe {str(name)!r} is neither a file nor a shipped recipe{hint} (shipped: {names})"
    )


def load_recipe(path: str | Path | None = None, overrides: typing.Sequence[str] = ()) -> Recipe:
    """Build a Recipe from an optional YAML file and ``section.key=value`` overrides."""
    data: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise RecipeError(f"recipe file {str(path)!r} does not exist; see recipes/*.yaml")
        try:
            loaded = yaml.safe_load(path.read_text())
        except yaml.YAMLError as exc:
            where = getattr(exc, "problem_mark", None)
            line = f":{where.line + 1}" if where is not None else ""
            what = getattr(exc, "problem", None) or type(exc).__name__
            raise RecipeError(f"{path}{line}: not valid YAML ({what})") from None
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise RecipeError(
                f"{path}: a recipe is a mapping of sections, got {type(loaded).__name__}"
            )
        data = loaded
    overridden: set[str] = set()  # budget keys given by overrides (two of them still clash)
    for item in overrides:
        section, key, value = _parse_override(item)
        data.setdefault(section, {})
        if not isinstance(data[section], dict):
            raise RecipeError(f"recipe section {section!r} must be a mapping")
        if section == "saliency" and key in BUDGET_KEYS:  # a budget override replaces the file's
            for other in set(BUDGET_KEYS) - overridden:
                data[section].pop(other, None)
            overridden.add(key)
        data[section][key] = value
    return recipe_from_dict(data)


def recipe_from_dict(data: dict[str, Any]) -> Recipe:
    return _build(Recipe, data, prefix="")


def _parse_override(item: str) -> tuple[str, str, Any]:
    if "=" not in item:
        raise RecipeError(f"--set expects section.key=value, got {item!r}")
    dotted, raw = item.split("=", 1)
    parts = dotted.strip().split(".")
    if len(parts) != 2 or not all(parts):
        raise RecipeError(f"--set expects section.key=value (e.g. quant.bits=3), got {item!r}")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return parts[0], parts[1], value


def _build(cls: type, data: Any, prefix: str) -> Any:
    where = prefix.rstrip(".") or "recipe"
    if not isinstance(data, dict):
        raise RecipeError(f"{where} must be a mapping, got {data!r}")
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for key, value in data.items():
        if key not in fields:
            close = difflib.get_close_matches(str(key), list(fields), n=1, cutoff=0.5)
            hint = f"; did you mean '{prefix}{close[0]}'?" if close else ""
            raise RecipeError(
                f"unknown key '{prefix}{key}'{hint} (valid: {', '.join(sorted(fields))})"
            )
        kwargs[key] = _coerce(hints[key], value, f"{prefix}{key}")
    try:
        return cls(**kwargs)
    except RecipeError:
        raise
    except (TypeError, ValueError) as exc:
        raise RecipeError(f"{where}: {exc}") from exc


def _coerce(tp: Any, value: Any, name: str) -> Any:
    """Check ``value`` against the annotation ``tp``; convert lossless cases (int -> float)."""
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, prefix=f"{name}.")
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(inner[0], value, name)
    if origin is tuple:
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list | tuple):
            raise RecipeError(f"{name} expects a list, got {value!r}")
        return tuple(_coerce(args[0], v, f"{name}[{i}]") for i, v in enumerate(value))
    if origin is dict:
        if not isinstance(value, dict):
            raise RecipeError(f"{name} expects a mapping, got {value!r}")
        return {str(k): _coerce(args[1], v, f"{name}[{k!r}]") for k, v in value.items()}
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise RecipeError(f"{name} expects true/false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise RecipeError(f"{name} expects an integer, got {value!r}")
    if tp is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads 1e-3 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise RecipeError(f"{name} expects a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, int | float) and not isinstance(value, bool):
            return str(value)
        raise RecipeError(f"{name} expects a string, got {value!r}")
    return value
