"""Attribution: signed-SNIP harm scores and utility (retain) scores over a model's linear weights."""

from harmjax.attribution.any_model import attribute
from harmjax.attribution.core import DEFAULT_SCOPE, KINDS, scored_names, scoped_names
from harmjax.attribution.scan import ResumeMismatchError, ScanResult, as_examples, scan, score

__all__ = ["attribute", "scoped_names", "DEFAULT_SCOPE", "KINDS", "ResumeMismatchError", "ScanResult", "as_examples", "scan", "score", "scored_names"]
