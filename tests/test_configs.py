"""Every config file in configs/ loads, and its model/mesh fields are usable by launch/."""

import importlib
import pathlib

import pytest

from harmjax.sharding import MeshConfig
from launch.common import mesh_config

CONFIGS = sorted(p.stem for p in (pathlib.Path(__file__).parent.parent / "configs").glob("*.py") if not p.stem.startswith("_"))


@pytest.mark.parametrize("name", CONFIGS)
def test_config_loads(name):
    cfg = importlib.import_module(f"configs.{name}").get_config()
    if "mesh" in cfg:
        mesh = mesh_config(cfg.mesh)
        assert isinstance(mesh, MeshConfig) and mesh.shape(8)  # resolvable on 8 devices
    if "model" in cfg:
        assert isinstance(cfg.model, str)


@pytest.mark.parametrize("name", ["embedded", "llama31_8b_instruct", "qwen25_14b_instruct", "qwen25_32b_instruct",
                                  "gpt_oss_20b", "qwen3_30b_a3b"])
def test_experiment_configs_have_every_field_the_pipeline_reads(name):
    """The paper configs only change values of configs/embedded.py's fields (a typo would add a
    field the pipeline never reads)."""
    from configs.embedded import get_config as base

    def keys(d, prefix=""):
        return {prefix + k for k in d} | {x for k, v in d.items() if isinstance(v, dict) for x in keys(v, prefix + k + ".")}

    cfg = importlib.import_module(f"configs.{name}").get_config().to_dict()
    assert keys(cfg) == keys(base().to_dict())


@pytest.mark.parametrize("name, hub_id", [("gpt_oss_20b", "openai/gpt-oss-20b"),
                                          ("qwen3_30b_a3b", "Qwen/Qwen3-30B-A3B-Instruct-2507")])
def test_moe_configs_are_the_paper_setup(name, hub_id):
    """The MoE configs run the paper's settings (those of the Llama-3.1-8B config) on their hub model."""
    paper = importlib.import_module("configs.llama31_8b_instruct").get_config().to_dict()
    cfg = importlib.import_module(f"configs.{name}").get_config().to_dict()
    assert cfg.pop("model") == hub_id
    paper.pop("model")
    assert cfg == paper


def test_baselines_configs():
    """The 8B baselines config only changes values of the embedded one's fields; the embedded
    one compares the model with its refusal-tuned variant, which it reaches through its
    `refusal` block; labels name every model; prompts and answers are the dissociation job's
    (so its cached stages serve them)."""
    from configs import baselines_embedded, baselines_llama31_8b, dissociation_embedded
    from harmjax.experiments.refusal.source import REFUSAL

    def keys(d, prefix=""):
        return {prefix + k for k in d} | {x for k, v in d.items() if isinstance(v, dict) for x in keys(v, prefix + k + ".")}

    emb, big = baselines_embedded.get_config(), baselines_llama31_8b.get_config()
    assert keys(big.to_dict()) == keys(emb.to_dict())
    assert REFUSAL in emb.models and "embedded" in emb.models and "refusal" in emb
    for cfg in (emb, big):
        assert len(cfg.labels) == len(cfg.models) == len(set(cfg.labels))
        assert 0 < cfg.masks.q and 0 < cfg.masks.p
    dis = dissociation_embedded.get_config()
    assert emb.prompts.to_dict() == dis.prompts.to_dict() and emb.answers.to_dict() == dis.answers.to_dict()
    assert big.masks.q == 1e-5 and big.masks.p == 5e-5 and big.dtype == "bfloat16"
