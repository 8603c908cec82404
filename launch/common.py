"""Helpers shared by the absl entry points: resolving the model argument and the mesh."""

from __future__ import annotations

from harmjax.sharding import MeshConfig


def resolve_model_source(model: str) -> str:
    """'embedded' becomes the converted SmolLM2 directory (fetched on first use); anything
    else (directory, .gguf file, hub id) is passed through."""
    if model == "embedded":
        from harmjax import assets

        return assets.default_model_dir()
    return model


def mesh_config(mesh) -> MeshConfig:
    """A MeshConfig from a config dict with data/fsdp/tensor entries."""
    return MeshConfig(data=int(mesh.data), fsdp=int(mesh.fsdp), tensor=int(mesh.tensor))
