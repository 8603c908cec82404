"""Claim 3, alignment compresses the harm mechanism: the main experiment on two models (`run`),
their curves and verdict (`measures`), report (`report`) and plot (`plots`). Entry point:
`run.run_compression`."""
