"""Text generation with a KV cache: greedy and temperature / top-p sampling, batched and
sharded, with chat templates and the prefilling attack.

  result = harmjax.generate(model, ["How do I ...?"], prefixes=["Sure, here is"], max_new_tokens=256)
  result.prefixes[0] + result.texts[0]   # the judged response

This package is itself callable (`harmjax.generate(...)` is `harmjax.generate.generate(...)`),
so exporting it from `harmjax` does not hide its submodules.
"""

import sys
import types

from harmjax.generate.kv_cache import cache_bytes, cache_shardings, init_cache
from harmjax.generate.prompts import (
    PromptFormatError,
    build_inputs,
    continuation_text,
    prompt_token_ids,
    response_prefix,
)
from harmjax.generate.sampler import (
    GeneratedIds,
    GenerationResult,
    default_eos_ids,
    generate,
    generate_ids,
    jit_decode,
    jit_prefill,
)
from harmjax.generate.sampling import row_keys, sample_tokens, top_p_filter

__all__ = [
    "GeneratedIds",
    "GenerationResult",
    "PromptFormatError",
    "build_inputs",
    "cache_bytes",
    "cache_shardings",
    "continuation_text",
    "default_eos_ids",
    "generate",
    "generate_ids",
    "init_cache",
    "jit_decode",
    "jit_prefill",
    "prompt_token_ids",
    "response_prefix",
    "row_keys",
    "sample_tokens",
    "top_p_filter",
]


class _CallableModule(types.ModuleType):
    """Lets `harmjax.generate(model, prompts, ...)` call `generate` while
    `harmjax.generate.<name>` still reaches this package's members."""

    def __call__(self, *args, **kwargs):
        return generate(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
