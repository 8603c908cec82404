"""The baselines comparison: the harm mask against the refusal direction,
Wanda, magnitude and random masks of the same size; see `run.py`."""
