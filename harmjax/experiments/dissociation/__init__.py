"""Dissociation (claim 5): data (`data`), stages (`run`), measures and verdict (`measures`),
report (`report`) and plot (`plots`). Entry point: `run.run_dissociation`."""
