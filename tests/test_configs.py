"""Every config file in configs/ loads, and its model/mesh fields are usable by launch/."""

import importlib
import pathlib

import pytest

from harmjax.sharding import MeshConfig
from launch.common import mesh_config

CONFIGS = sorted(p.stem for p in (pathlib.Path(__file__).parent.parent / "configs").glob("*.py") if p.stem != "__init__")


@pytest.mark.parametrize("name", CONFIGS)
def test_config_loads(name):
    cfg = importlib.import_module(f"configs.{name}").get_config()
    if "mesh" in cfg:
        mesh = mesh_config(cfg.mesh)
        assert isinstance(mesh, MeshConfig) and mesh.shape(8)  # resolvable on 8 devices
    if "model" in cfg:
        assert isinstance(cfg.model, str)
