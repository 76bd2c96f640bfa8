"""What a Python user imports: the public API of `empg_rllib`, and the environments installed
as `empg_envs` whatever folders the user's working directory holds."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import tomllib

import empg_rllib

ROOT = Path(__file__).resolve().parent.parent


def test_every_public_name_resolves_to_what_its_module_defines():
    import importlib

    assert sorted(empg_rllib.__all__) == sorted(empg_rllib._EXPORTS)
    for name in empg_rllib.__all__:
        module = importlib.import_module(empg_rllib._EXPORTS[name])
        assert getattr(empg_rllib, name) is getattr(module, empg_rllib._RENAMED.get(name, name))
    from empg_rllib.algorithm.empg import EMPG, EMPGConfig

    assert empg_rllib.EMPGConfig().algo_class is EMPG and EMPGConfig is empg_rllib.EMPGConfig


def test_importing_the_package_or_its_math_does_not_import_ray():
    code = "import sys, empg_rllib, empg_rllib.core.advantages, empg_rllib.core.batch; print('ray' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True, cwd=ROOT)
    assert out.stdout.strip() == "False"


def test_load_experiment_validates_like_the_cli(tmp_path):
    exp = empg_rllib.load_experiment("tuned_examples/demo.yaml", ["iterations=3", "group_size=2"])
    assert isinstance(exp, empg_rllib.Experiment) and (exp.iterations, exp.group_size) == (3, 2)
    try:
        empg_rllib.load_experiment("tuned_examples/demo.yaml", ["group_sise=2"])
    except empg_rllib.ConfigError as err:
        assert "did you mean 'group_size'" in str(err)
    else:
        raise AssertionError("a misspelt key was accepted")


def test_a_folder_named_envs_in_the_working_directory_does_not_shadow_the_environments(tmp_path):
    shadow = tmp_path / "envs"
    shadow.mkdir()
    (shadow / "__init__.py").write_text("raise ImportError('the user folder was imported')\n")
    code = "import empg_envs, empg_rllib.config.loading; print(empg_envs.__file__)"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True, cwd=tmp_path, env=env)
    assert Path(out.stdout.strip()).parent == ROOT / "envs"


def test_the_packaging_lists_every_package_of_the_tree():
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(config["packages"])
    found = {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "empg_rllib").rglob("__init__.py")}
    found |= {".".join(("empg_envs", *p.parent.relative_to(ROOT / "envs").parts)) for p in (ROOT / "envs").rglob("__init__.py")}
    assert listed == found
    assert config["package-dir"] == {"empg_envs": "envs"}
