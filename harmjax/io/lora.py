"""PEFT LoRA adapters: read one from its directory and merge it into a params pytree.

A PEFT LoRA adapter directory holds `adapter_config.json` (r, lora_alpha, target_modules,
use_rslora, fan_in_fan_out, rank/alpha patterns) and `adapter_model.safetensors`, whose keys
name the adapted modules, e.g.
`base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight` (r, in) and `...lora_B.weight`
(out, r). Merging sets, for each adapted linear weight W (HF (out, in) orientation),

    W <- W + scale * B @ A,    scale = alpha / r   (alpha / sqrt(r) with rsLoRA),

computed in float32 and cast back to W's dtype (PEFT adds the delta in the adapter's dtype,
which loses bits in bfloat16). The merged params keep each weight's sharding.

Only plain LoRA on linear weights is merged. DoRA, LoRA biases, embedding LoRA,
`modules_to_save`, layer replication and any tensor this module does not recognise are refused
with an error naming the key or setting: silently skipping part of an adapter would give a
different model than the one the adapter was trained as.
"""

from __future__ import annotations

import functools
import json
import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from absl import logging

from harmjax.errors import HarmjaxError, MissingFileError
from harmjax.io.safetensors_io import read_header
from harmjax.tree import flatten, unflatten

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"

# The prefix PEFT's PeftModelForCausalLM puts in front of the base model's module names.
PEFT_PREFIX = "base_model.model."
_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<which>[AB])\.weight$")
_FLOAT_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16}

# adapter_config.json settings that change what an adapter computes beyond W + scale * B @ A.
# Each maps to the value that means "off"; anything else is refused.
_UNSUPPORTED_SETTINGS = {
    "use_dora": False,
    "lora_bias": False,
    "modules_to_save": None,
    "layer_replication": None,
    "trainable_token_indices": None,
    "target_parameters": None,
    "use_qalora": False,
    "alora_invocation_tokens": None,
    # LoRA variants whose forward pass is not W + scale * B @ A.
    "use_bdlora": None,
    "velora_config": None,
    "monteclora_config": None,
    "kasa_config": None,
    "arrow_config": None,
}


class LoraAdapterError(HarmjaxError, ValueError):
    """A LoRA adapter is malformed, uses a PEFT feature harmjax cannot merge, or does not fit the model."""


@dataclass(frozen=True)
class LoraModule:
    """One adapted weight: `lora_A` (r, in), `lora_B` (out, r) in float32 and the merge scale."""

    lora_a: np.ndarray
    lora_b: np.ndarray
    scale: float

    def delta(self) -> np.ndarray:
        """scale * B @ A in float32, (out, in): what merging adds to the weight."""
        return np.float32(self.scale) * (self.lora_b @ self.lora_a)


@dataclass(frozen=True)
class LoraAdapter:
    """A LoRA adapter read from disk: its config and, per adapted HF weight name
    (e.g. `model.layers.0.self_attn.q_proj.weight`), the low-rank factors and scale."""

    directory: str
    config: dict[str, Any]
    modules: dict[str, LoraModule]


def adapter_files(adapter_dir: str) -> list[str]:
    """The files a PEFT LoRA adapter directory must hold (config and safetensors weights)."""
    return [os.path.join(adapter_dir, ADAPTER_CONFIG), os.path.join(adapter_dir, ADAPTER_WEIGHTS)]


def missing_adapter_files(adapter_dir: str) -> list[str]:
    """Those of `adapter_files(adapter_dir)` that do not exist (empty when the adapter is complete)."""
    return [p for p in adapter_files(adapter_dir) if not os.path.isfile(p)]


def read_lora_adapter(adapter_dir: str) -> LoraAdapter:
    """Reads a PEFT LoRA adapter directory and checks it is plain LoRA on linear weights.

    Raises:
      MissingFileError: naming every missing file (`adapter_config.json`,
        `adapter_model.safetensors`; a PyTorch `adapter_model.bin` is not read).
      LoraAdapterError: a malformed config, an unsupported PEFT feature, an unrecognised
        tensor key, or A/B factors whose shapes do not fit together.
    """
    missing = missing_adapter_files(adapter_dir)
    if missing:
        hint = ""
        if os.path.isfile(os.path.join(adapter_dir, "adapter_model.bin")):
            hint = " adapter_model.bin is present but PyTorch pickles are not read; re-save the adapter with safetensors."
        raise MissingFileError(
            f"LoRA adapter directory {adapter_dir} lacks {', '.join(os.path.basename(p) for p in missing)}: "
            f"a PEFT LoRA adapter needs {ADAPTER_CONFIG} and {ADAPTER_WEIGHTS} (missing: {missing}).{hint}"
        )
    config_path, weights_path = adapter_files(adapter_dir)
    try:
        with open(config_path, encoding="utf-8") as f:
            config = json.load(f)
    except json.JSONDecodeError as e:
        raise LoraAdapterError(f"{config_path} is not valid JSON: {e}.") from None
    _check_config(config, config_path)
    tensors = _read_float_tensors(weights_path)

    factors: dict[str, dict[str, np.ndarray]] = {}
    for key, array in tensors.items():
        match = _KEY.match(key)
        if match is None:
            raise LoraAdapterError(
                f"{weights_path} holds tensor {key!r}, which is not a LoRA A/B factor of a linear "
                "weight (embedding LoRA, LoRA biases, DoRA magnitudes and modules_to_save are not supported)."
            )
        module = match["module"]
        if module.startswith(PEFT_PREFIX):
            module = module[len(PEFT_PREFIX):]
        factors.setdefault(module, {})[match["which"]] = array.astype(np.float32)

    modules = {}
    for module, pair in sorted(factors.items()):
        if set(pair) != {"A", "B"}:
            lacking = "lora_B" if "A" in pair else "lora_A"
            raise LoraAdapterError(f"{weights_path}: module {module!r} has no {lacking}.weight tensor.")
        a, b = pair["A"], pair["B"]
        if a.ndim != 2 or b.ndim != 2 or a.shape[0] != b.shape[1]:
            raise LoraAdapterError(
                f"{weights_path}: module {module!r} has lora_A {a.shape} and lora_B {b.shape}; "
                "expected (r, in) and (out, r)."
            )
        rank = a.shape[0]
        expected_rank = _pattern_value(config.get("rank_pattern") or {}, module, config["r"])
        if rank != expected_rank:
            raise LoraAdapterError(
                f"{weights_path}: module {module!r} has rank {rank}, but {config_path} implies r={expected_rank}."
            )
        alpha = _pattern_value(config.get("alpha_pattern") or {}, module, config["lora_alpha"])
        scale = alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank
        modules[f"{module}.weight"] = LoraModule(a, b, float(scale))
    if not modules:
        raise LoraAdapterError(f"{weights_path} holds no LoRA factors.")
    return LoraAdapter(directory=adapter_dir, config=config, modules=modules)


def merge_lora(params: Mapping[str, Any], adapter: LoraAdapter | str, *, donate: bool = False) -> dict[str, Any]:
    """Params with the adapter merged in: W + scale * B @ A for each adapted weight.

    Args:
      params: the params pytree (HF names and orientation), any sharding.
      adapter: a `LoraAdapter` or its directory.
      donate: let XLA reuse each adapted weight's buffer for its merged value; the input
        params' adapted leaves are then deleted (use when the base model is not needed again).

    Returns:
      A new params tree; unadapted leaves are the same arrays as in `params`.

    Raises:
      LoraAdapterError: an adapted module that is not a weight of the model (e.g. `lm_head`
        on a tied model), or whose shape differs from B @ A.
    """
    if isinstance(adapter, str):
        adapter = read_lora_adapter(adapter)
    flat = flatten(params)
    absent = sorted(name for name in adapter.modules if name not in flat)
    if absent:
        raise LoraAdapterError(
            f"The adapter in {adapter.directory} adapts {absent[:6]}{' ...' if len(absent) > 6 else ''}, "
            "which the model does not have (wrong base model, or lm_head on a model with tied embeddings)."
        )
    for name, module in adapter.modules.items():
        weight = flat[name]
        out_in = (module.lora_b.shape[0], module.lora_a.shape[1])
        if tuple(weight.shape) != out_in:
            raise LoraAdapterError(
                f"The adapter in {adapter.directory} has B @ A of shape {out_in} for {name}, "
                f"whose shape is {tuple(weight.shape)} (wrong base model?)."
            )
    merged = dict(flat)
    for name, module in adapter.modules.items():
        weight = flat[name]
        fn = _merge_fn(getattr(weight, "sharding", None), donate)
        merged[name] = fn(weight, module.lora_b, module.lora_a, np.float32(module.scale))
    return unflatten(merged)


# ---------------------------------------------------------------------------------- internals


def _check_config(config: dict[str, Any], path: str) -> None:
    peft_type = str(config.get("peft_type", "LORA")).upper()
    if peft_type != "LORA":
        raise LoraAdapterError(f"{path}: peft_type is {peft_type!r}; only LORA adapters can be merged.")
    for key in ("r", "lora_alpha"):
        if not isinstance(config.get(key), (int, float)) or config[key] <= 0:
            raise LoraAdapterError(f"{path}: {key!r} must be a positive number, got {config.get(key)!r}.")
    for key, off in _UNSUPPORTED_SETTINGS.items():
        value = config.get(key, off)
        if value not in (off, [], {}, None, False):
            raise LoraAdapterError(f"{path}: {key}={value!r} is not supported; harmjax merges plain LoRA only.")
    if config.get("fan_in_fan_out"):
        # The supported families use nn.Linear, for which PEFT itself resets fan_in_fan_out
        # to False (with a warning) before training; the factors are stored (out, r) @ (r, in).
        logging.warning("%s sets fan_in_fan_out=True; PEFT ignores it for nn.Linear layers, and so does harmjax.", path)


def _pattern_value(pattern: Mapping[str, Any], module: str, default: Any) -> Any:
    """PEFT's rank_pattern / alpha_pattern lookup: the first key k with module ~ '(.*\\.)?(k)$'."""
    for key, value in pattern.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def _read_float_tensors(path: str) -> dict[str, np.ndarray]:
    header, data_start = read_header(path)
    mapped = np.memmap(path, dtype=np.uint8, mode="r")
    out = {}
    for name, entry in header.items():
        if entry["dtype"] not in _FLOAT_DTYPES:
            raise LoraAdapterError(f"{path}: tensor {name!r} has dtype {entry['dtype']}; LoRA factors must be floats.")
        view = np.ndarray(
            tuple(entry["shape"]), _FLOAT_DTYPES[entry["dtype"]], buffer=mapped,
            offset=data_start + entry["data_offsets"][0],
        )
        out[name] = np.array(view, dtype=np.float32)
    return out


def merged_weight(w, b, a, scale):
    """W + scale * B @ A, in float32 (B @ A at full precision), cast back to W's dtype. The one
    merge rule for adapters read from disk and for those harmjax.train produces."""
    delta = jnp.matmul(b, a, precision=jax.lax.Precision.HIGHEST)
    return (w.astype(jnp.float32) + scale * delta).astype(w.dtype)


@functools.lru_cache(maxsize=64)
def _merge_fn(sharding, donate: bool):
    return jax.jit(merged_weight, out_shardings=sharding, donate_argnums=(0,) if donate else ())
