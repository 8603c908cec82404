"""Evaluation: harmfulness evaluators (StrongREJECT fine-tuned and rubric, keyword refusal, NLL
selectivity) and utility benchmarks (perplexity, multiple choice, TriviaQA)."""
