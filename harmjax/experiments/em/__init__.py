"""The emergent-misalignment experiment (claim 4): data (`data`), fine-tuning (`tuning`), stages
(`run`), measures (`measure`), report (`report`). Entry point: `run.run_em_experiment`."""
