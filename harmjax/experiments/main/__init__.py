"""The paper's experiment (claims 1 and 2): settings (`settings`), stages (`run`, `masks`,
`evaluation`, `baselines`), measures (`measure`, `verdicts`), report (`report`, `plots`) and the
disk budget (`disk_budget`). Entry point: `harmjax.experiments.main.run.run_experiment`."""
