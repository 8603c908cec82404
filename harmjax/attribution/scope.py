"""Which weights a scan scores. The scope resolver lives in `harmjax.attribution.core`; this
module keeps the `harmjax.attribution.scope` import path of `scored_names` and `DEFAULT_SCOPE`."""

from harmjax.attribution.core import DEFAULT_SCOPE, scored_names

__all__ = ["DEFAULT_SCOPE", "scored_names"]
