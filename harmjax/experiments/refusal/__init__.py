"""The refusal-tuned model harmjax makes itself (issue 13): its data (`data`), tuning
(`tuning`), evaluation (`eval`), report (`report`), the stages that tie them (`run`), and the
`model = "refusal"` source the other experiments use (`source`)."""
