"""docs/configuration.md: every experiment key, rendered from the schema (`config.schema`).

Each key's meaning is its pydantic `description`, each section's introduction its class
docstring; types, defaults and bounds come from the fields themselves, so the reference cannot
drift from what `empg train` accepts. A field without a description, or a section without a
docstring, is an error here rather than a silent gap in the page.

    python -m empg_rllib.config.reference -o docs/configuration.md   # regenerate
    python -m empg_rllib.config.reference --check docs/configuration.md   # exit 1 if stale
"""

from __future__ import annotations

import argparse
import difflib
import inspect
import json
import sys
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any, Literal, Union, get_args, get_origin

import annotated_types
from pydantic import BaseModel
from pydantic.fields import FieldInfo

from empg_rllib.config.schema import Experiment

#: The command that writes docs/configuration.md; the page's header and `--check` name it.
COMMAND = "python -m empg_rllib.config.reference -o docs/configuration.md"

_BOUNDS = ((annotated_types.Ge, ">="), (annotated_types.Gt, ">"), (annotated_types.Le, "<="), (annotated_types.Lt, "<"))


class MissingDescription(ValueError):
    """A schema field without a description, or a section class without a docstring."""


def _section_of(annotation: Any) -> type[BaseModel] | None:
    """The settings class of a section field (`X` or `X | None`), else None."""
    for candidate in (annotation, *get_args(annotation)):
        if isinstance(candidate, type) and issubclass(candidate, BaseModel):
            return candidate
    return None


def _key(name: str, field: FieldInfo) -> str:
    return field.alias or name


def type_name(annotation: Any) -> str:
    """A readable type: `int`, `float | None`, `"hf" | "vllm"`, `list[str]`, `dict[str, Any]`."""
    if annotation is type(None) or annotation is None:
        return "None"
    if annotation is Any:
        return "Any"
    origin = get_origin(annotation)
    if origin is Annotated:
        return type_name(get_args(annotation)[0])
    if origin is Literal:
        return " | ".join(json.dumps(v) if isinstance(v, str) else repr(v) for v in get_args(annotation))
    if origin in (Union, types.UnionType):
        args = get_args(annotation)
        # None last, as in `float | None`.
        ordered = [a for a in args if a is not type(None)] + [a for a in args if a is type(None)]
        return " | ".join(type_name(a) for a in ordered)
    if origin is not None:
        return f"{getattr(origin, '__name__', str(origin))}[{', '.join(type_name(a) for a in get_args(annotation))}]"
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return "section"
    if isinstance(annotation, type):
        return annotation.__name__
    return str(annotation)


def _bounds(metadata: list[Any], subject: str) -> list[str]:
    out = []
    for item in metadata:
        for kind, op in _BOUNDS:
            if isinstance(item, kind):
                value = getattr(item, kind.__name__.lower())
                shown = f"{value:g}" if isinstance(value, (int, float)) else str(value)
                out.append(f"{subject} {op} {shown}")
        if isinstance(item, annotated_types.MinLen):
            out.append(f"at least {item.min_length} item{'s' if item.min_length != 1 else ''}")
        if isinstance(item, annotated_types.MaxLen):
            out.append(f"at most {item.max_length} items")
    return out


def constraints(field: FieldInfo) -> str:
    """The field's bounds (`>= 0`, `> 0`, `<= 1`, ...), and those of a dict's values."""
    found = _bounds(field.metadata, "")
    for arg in get_args(field.annotation):
        if get_origin(arg) is Annotated:  # e.g. dict[str, Annotated[float, Field(gt=0)]]
            inner = [m for meta in arg.__metadata__ for m in (meta.metadata if isinstance(meta, FieldInfo) else [meta])]
            found += _bounds(inner, "values")
    return ", ".join(item.strip() for item in found)


def default_text(field: FieldInfo) -> str:
    """The default as YAML writes it (`null`, `true`, `[...]`); a section at its own defaults: `{}`."""
    if field.is_required():
        return "required"
    value = field.get_default(call_default_factory=True)
    if isinstance(value, BaseModel):
        if value == type(value)():
            return "{}"
        value = value.model_dump(mode="json", by_alias=True)
    return json.dumps(value, default=str)


def description(key: str, field: FieldInfo) -> str:
    """The field's description on one line, or MissingDescription naming the key."""
    text = " ".join((field.description or "").split())
    if not text:
        raise MissingDescription(
            f"experiment key {key!r} has no description: add description=... to its Field in "
            "empg_rllib/config/schema.py"
        )
    return text


def section_intro(key: str, section: type[BaseModel]) -> str:
    """The section class's own docstring (not inherited), or MissingDescription."""
    doc = section.__dict__.get("__doc__")
    if not doc or not doc.strip():
        raise MissingDescription(
            f"section {key!r} ({section.__name__}) has no docstring: add one in empg_rllib/config/schema.py"
        )
    return inspect.cleandoc(doc)


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def _code(text: str) -> str:
    return f"`{text}`" if text else ""


def _table(model: type[BaseModel], prefix: str) -> list[str]:
    lines = ["| Key | Type | Default | Constraints | Meaning |", "| --- | --- | --- | --- | --- |"]
    for name, field in model.model_fields.items():
        key = prefix + _key(name, field)
        meaning = description(key, field)
        section = _section_of(field.annotation)
        if section is not None:
            meaning += f"; the `{key}` section below"
        cells = (
            _code(key),
            _code(type_name(field.annotation)),
            _code(default_text(field)),
            _code(constraints(field)),
            meaning,
        )
        lines.append("| " + " | ".join(_cell(c) for c in cells) + " |")
    return lines


def _sections(model: type[BaseModel], prefix: str) -> Iterator[tuple[str, type[BaseModel]]]:
    for name, field in model.model_fields.items():
        section = _section_of(field.annotation)
        if section is not None:
            key = prefix + _key(name, field)
            yield key, section
            yield from _sections(section, key + ".")


def configuration_markdown(model: type[BaseModel] = Experiment) -> str:
    """The configuration reference of `model` (the experiment schema) as Markdown."""
    out = [
        "# Experiment configuration",
        "",
        f"_Generated from empg_rllib/config/schema.py by `{COMMAND}`; do not edit by hand._",
        "",
        "Every key an experiment file (`tuned_examples/*.yaml`) or a `--set key=value` override may set. "
        "Keys inside a section are written nested in YAML (`vllm: {kv_cache_gib: 2}`) or dotted in "
        "`--set` (`--set vllm.kv_cache_gib=2`); a section left out keeps all its defaults (`{}`). "
        "Defaults are written as YAML (`null`, `true`).",
        "",
        "## Top-level keys",
        "",
        section_intro("(top level)", model),
        "",
        *_table(model, ""),
    ]
    for key, section in _sections(model, ""):
        out += ["", f"## `{key}`", "", section_intro(key, section), "", *_table(section, key + ".")]
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m empg_rllib.config.reference",
        description="Print the experiment configuration reference (docs/configuration.md) generated from the schema.",
    )
    group = parser.add_mutually_exclusive_group()
    group.add_argument("-o", "--output", type=Path, help="write it to this file instead of printing it")
    group.add_argument("--check", type=Path, metavar="FILE", help="exit 1 if FILE differs from what would be generated")
    args = parser.parse_args(argv)
    text = configuration_markdown()
    if args.check is not None:
        current = args.check.read_text() if args.check.is_file() else None
        if current == text:
            return 0
        if current is None:
            print(f"{args.check} does not exist; generate it with: {COMMAND}", file=sys.stderr)
            return 1
        diff = difflib.unified_diff(
            current.splitlines(keepends=True), text.splitlines(keepends=True), str(args.check), "generated"
        )
        sys.stderr.writelines(list(diff)[:40])
        print(
            f"\n{args.check} is out of date with empg_rllib/config/schema.py; regenerate it with: {COMMAND}",
            file=sys.stderr,
        )
        return 1
    if args.output is not None:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(text)
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
