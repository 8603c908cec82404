"""Attribution: signed-SNIP harm scores and utility (retain) scores over a model's linear weights."""

from harmjax.attribution.any_model import attribute, scoped_names
from harmjax.attribution.scan import ResumeMismatchError, ScanResult, as_examples, scan, score
from harmjax.attribution.scope import DEFAULT_SCOPE, scored_names
from harmjax.attribution.step import KINDS

__all__ = ["attribute", "scoped_names", "DEFAULT_SCOPE", "KINDS", "ResumeMismatchError", "ScanResult", "as_examples", "scan", "score", "scored_names"]
