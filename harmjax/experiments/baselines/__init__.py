"""The baselines comparison (issue 28 point 4): the harm mask against the refusal direction,
Wanda, magnitude and random masks of the same size; see `run.py`."""
