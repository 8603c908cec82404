"""The text tower of a multimodal checkpoint (Gemma-3's Gemma3ForConditionalGeneration).

Such a checkpoint stores the language model under a prefix and beside it a vision tower and
a projector. harmjax reads the text tower only: its tensors are renamed to the text-only
model's names (`model.*`, `lm_head.*`), the vision tensors are skipped by name, and the
params tree, scores, masks and exports all use the text-only names (see docs/design.md,
"Loading and conversion").
"""

from __future__ import annotations

from collections.abc import Iterable

# (prefix in the file, prefix in the params). transformers 5 and the hub's Gemma-3 files use
# `language_model.model.*` (+ `language_model.lm_head.*` when untied); transformers 4.5x
# saved `model.language_model.*` with a top-level `lm_head.*`.
TEXT_PREFIXES = (
    ("language_model.model.", "model."),
    ("language_model.lm_head.", "lm_head."),
    ("model.language_model.", "model."),
)
# Tensors of the other towers, ignored on load.
OTHER_TOWER_PREFIXES = (
    "vision_tower.",
    "multi_modal_projector.",
    "model.vision_tower.",
    "model.multi_modal_projector.",
)


def text_tower_names(file_names: Iterable[str]) -> dict[str, str]:
    """Params name -> tensor name in the file. For a file without a text-tower prefix, every
    name maps to itself; otherwise prefixed names lose their prefix, the other towers' tensors
    are dropped and any remaining name (e.g. a top-level `lm_head.weight`) is kept as it is."""
    file_names = list(file_names)
    if not any(n.startswith(p) for n in file_names for p, _ in TEXT_PREFIXES):
        return {n: n for n in file_names}
    out = {}
    for name in file_names:
        if name.startswith(OTHER_TOWER_PREFIXES):
            continue
        for prefix, target in TEXT_PREFIXES:
            if name.startswith(prefix):
                out[target + name[len(prefix):]] = name
                break
        else:
            out[name] = name
    return out
