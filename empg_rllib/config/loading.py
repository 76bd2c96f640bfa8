"""Reading settings files: YAML checked against a pydantic schema, `--set` overrides, and error
messages that name the key.

One reader, one dotted-key setter and one error formatter serve every file the project reads:
experiment files, sweep files and compare files. An unknown key names the nearest valid key; a
value of the wrong type names the key and the type expected.
"""

from __future__ import annotations

import copy
import difflib
import os
from pathlib import Path
from typing import Any, TypeVar, get_args

import yaml
from pydantic import BaseModel, ValidationError

from empg_rllib.config.schema import ConfigError, Experiment, check_agent, check_engine, check_environment

SettingsT = TypeVar("SettingsT", bound=BaseModel)

#: The experiment files shipped inside the package (the repository's `tuned_examples/`).
TUNED_EXAMPLES = Path(__file__).resolve().parent.parent / "tuned_examples"


def experiment_path(path: str | os.PathLike) -> Path:
    """`path` itself, or else the shipped file it names (`tuned_examples/demo.yaml`,
    `demo.yaml`), so that an installed wheel runs its examples from any directory."""
    path = Path(path)
    if path.exists():
        return path
    parts = path.parts[1:] if path.parts[:1] == ("tuned_examples",) else path.parts
    shipped = TUNED_EXAMPLES.joinpath(*parts) if parts and not path.is_absolute() else None
    if shipped is not None and shipped.is_file():
        return shipped
    raise ConfigError(
        f"experiment file {str(path)!r} does not exist here, nor among the shipped examples in {TUNED_EXAMPLES}"
    )


def read_yaml(path: Path) -> dict[str, Any]:
    """The mapping a YAML file holds (an empty file: {}), or a ConfigError naming the file."""
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a settings file must be a mapping of keys, got {type(data).__name__}")
    return data


def set_key(data: dict[str, Any], key: str, value: Any) -> None:
    """`data[a][b] = value` for `key` "a.b", making sections on the way."""
    parts = key.split(".")
    node = data
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"{key!r}: {part!r} is not a section")
    node[parts[-1]] = value


def with_values(data: dict[str, Any], values: dict[str, Any]) -> dict[str, Any]:
    """A copy of `data` with each dotted key of `values` set."""
    data = copy.deepcopy(data)
    for key, value in values.items():
        set_key(data, key, value)
    return data


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply `key=value` / `a.b=value` overrides (values parsed as YAML) to a raw config dict."""
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r} is not key=value")
        try:
            set_key(data, key, yaml.safe_load(value) if value != "" else "")
        except ConfigError as err:
            raise ConfigError(f"override {item!r}: {err}") from None
    return data


def _section(annotation: Any) -> type[BaseModel] | None:
    """The settings class of a section field, optional (`X | None`) or not."""
    for candidate in (annotation, *get_args(annotation)):
        if isinstance(candidate, type) and issubclass(candidate, BaseModel):
            return candidate
    return None


def _fields_at(schema: type[BaseModel], path: tuple[Any, ...]) -> list[str]:
    model: Any = schema
    for part in path:
        field = model.model_fields.get(part) if isinstance(part, str) else None
        model = _section(field.annotation) if field is not None else None
        if model is None:
            return []
    return [field.alias or name for name, field in model.model_fields.items()]


def _describe(error: dict[str, Any], schema: type[BaseModel]) -> str:
    loc = tuple(error["loc"])
    key = ".".join(str(p) for p in loc)
    if error["type"] == "extra_forbidden":
        valid = _fields_at(schema, loc[:-1])
        close = difflib.get_close_matches(str(loc[-1]), valid, n=1, cutoff=0.5)
        hint = f"; did you mean {'.'.join([*map(str, loc[:-1]), close[0]])!r}?" if close else ""
        return f"unknown key {key!r}{hint} (valid keys here: {', '.join(valid)})"
    expected = error["msg"].removeprefix("Input should be ").removeprefix("Value error, ")
    if not loc:  # a rule across keys; its message names them
        return expected
    if error["type"] == "missing":
        return f"missing key {key!r}"
    return f"bad value for {key!r}: {error.get('input')!r}; expected {expected}"


def check(schema: type[SettingsT], data: Any) -> SettingsT:
    """`data` validated against `schema`, or one ConfigError naming every bad key."""
    if not isinstance(data, dict):
        raise ConfigError(f"a settings file must be a mapping of keys, got {type(data).__name__}")
    try:
        return schema.model_validate(data)
    except ValidationError as err:
        raise ConfigError("; ".join(_describe(e, schema) for e in err.errors())) from None


def read_file(path: str | os.PathLike, schema: type[SettingsT]) -> tuple[Path, SettingsT]:
    """A YAML file (or the shipped one it names) checked against `schema`."""
    path = experiment_path(path)
    return path, check(schema, read_yaml(path))


def validate(data: dict[str, Any]) -> Experiment:
    """An `Experiment` from a raw dict, or a ConfigError naming every bad key; the environment
    settings are checked after the schema (`check_environment`)."""
    exp = check(Experiment, data)
    check_environment(exp)
    check_agent(exp)
    check_engine(exp)
    return exp


def load(path: str | os.PathLike, overrides: list[str] | None = None) -> Experiment:
    """Read, override and validate an experiment YAML file (`experiment_path` finds it)."""
    return validate(apply_overrides(read_yaml(experiment_path(path)), list(overrides or [])))


def base_experiment(experiment: str | dict[str, Any], file: Path) -> dict[str, Any]:
    """The base experiment a sweep or compare `file` names: inline, a path relative to the
    file, or a shipped example (`tuned_examples/demo.yaml`)."""
    if isinstance(experiment, dict):
        return copy.deepcopy(experiment)
    base_path = (file.parent / experiment).resolve()
    if not base_path.exists():
        try:
            base_path = experiment_path(experiment)
        except ConfigError:
            raise ConfigError(f"experiment: {str(base_path)!r} does not exist") from None
    return read_yaml(base_path)
