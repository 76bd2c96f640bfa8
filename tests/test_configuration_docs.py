"""docs/configuration.md is generated from the experiment schema and kept in step with it."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import BaseModel, Field

from empg_rllib.config import reference
from empg_rllib.config.schema import Experiment

DOC = Path(__file__).resolve().parent.parent / "docs" / "configuration.md"


def schema_keys(model: type[BaseModel] = Experiment, prefix: str = "") -> list[tuple[str, type[BaseModel], str]]:
    """(dotted YAML key, owning class, field name) of every field, walked from the schema itself."""
    keys = []
    for name, field in model.model_fields.items():
        key = prefix + (field.alias or name)
        keys.append((key, model, name))
        section = reference._section_of(field.annotation)
        if section is not None:
            keys += schema_keys(section, key + ".")
    return keys


def test_committed_reference_is_up_to_date():
    assert DOC.is_file(), f"{DOC} is missing; generate it with: {reference.COMMAND}"
    assert DOC.read_text() == reference.configuration_markdown(), (
        f"docs/configuration.md is out of date with empg_rllib/config/schema.py; regenerate it with: "
        f"{reference.COMMAND}"
    )


def test_every_key_of_every_section_is_documented():
    text = reference.configuration_markdown()
    keys = schema_keys()
    # Nested sections are walked, the YAML alias is used, and the new key is there.
    for expected in ("empg.k", "vllm.kv_cache_gib", "resources.env_runner.cpus", "async.max_policy_lag",
                     "lora.target_modules", "gradient_checkpointing"):
        assert expected in [k for k, _, _ in keys]
    assert "async_" not in text
    for key, model, name in keys:
        field = model.model_fields[name]
        assert field.description and field.description.strip(), f"{model.__name__}.{name} ({key}) has no description"
        row = next((line for line in text.splitlines() if line.startswith(f"| `{key}` |")), None)
        assert row is not None, f"{key} is not in the reference"
        assert " ".join(field.description.split()).replace("|", "\\|") in row
    for key, model, name in keys:
        section = reference._section_of(model.model_fields[name].annotation)
        if section is not None:
            assert f"## `{key}`" in text
            assert reference.section_intro(key, section).splitlines()[0] in text


def test_types_defaults_and_bounds_are_rendered():
    rows = {line.split(" | ")[0].removeprefix("| "): line for line in reference.configuration_markdown().splitlines()}
    assert rows["`engine`"].startswith('| `engine` | `"hf" \\| "vllm"` | `"hf"` |')
    assert rows["`vllm.kv_cache_gib`"].startswith("| `vllm.kv_cache_gib` | `float \\| None` | `null` | `> 0` |")
    assert "`> 0, <= 1`" in rows["`vllm.gpu_memory_utilization`"]
    assert "| `list[str]` |" in rows["`evaluation.splits`"]
    assert "| `dict[str, Any]` | `{}` |" in rows["`env_config`"]
    assert "`values > 0`" in rows["`resources.learner.custom`"]
    assert rows["`gradient_checkpointing`"].startswith("| `gradient_checkpointing` | `bool` | `false` |")
    assert rows["`lora`"].startswith("| `lora` | `section \\| None` | `null` |")


def test_a_field_without_description_stops_the_generator():
    class Section(BaseModel):
        """A section."""

        documented: int = Field(1, description="has one")
        bare: int = Field(2, ge=0)

    class Top(BaseModel):
        """Top level."""

        section: Section = Field(Section(), description="a section")

    with pytest.raises(reference.MissingDescription, match=r"'section\.bare' has no description"):
        reference.configuration_markdown(Top)

    class Undocumented(BaseModel):
        value: int = Field(1, description="has one")

    class Top2(BaseModel):
        """Top level."""

        part: Undocumented = Field(Undocumented(), description="a section")

    with pytest.raises(reference.MissingDescription, match=r"section 'part' \(Undocumented\) has no docstring"):
        reference.configuration_markdown(Top2)


def test_check_mode(tmp_path, capsys):
    good = tmp_path / "configuration.md"
    assert reference.main(["-o", str(good)]) == 0
    assert reference.main(["--check", str(good)]) == 0
    good.write_text(good.read_text().replace("rank of the adapters", "rank"))
    assert reference.main(["--check", str(good)]) == 1
    err = capsys.readouterr().err
    assert "out of date" in err and reference.COMMAND in err
    assert reference.main(["--check", str(tmp_path / "missing.md")]) == 1
