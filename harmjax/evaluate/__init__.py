"""Evaluation: harmfulness evaluators (StrongREJECT fine-tuned and rubric judges, keyword refusal,
over-refusal of harmless prompts that sound harmful, judge-free NLL selectivity), utility
benchmarks (perplexity, multiple choice, TriviaQA), and emergent misalignment (sampled answers
to the EM questions, a 0-100 number judge, and the judge-free misalignment preference)."""

from harmjax.evaluate.em_preference import (
    EMPair, EMPairFormatError, PreferenceResult, load_em_pairs, misalignment_preference,
)
from harmjax.evaluate.emergent import (
    EMFormatError, EMQuestion, EMRate, JudgePrompts, RateInterval, em_rate, is_misaligned, judge_answers,
    load_em_questions, load_judge_prompts, sample_answers, summarize_em,
)
from harmjax.evaluate.number_judge import NumberJudgeError, NumberScores, build_trie, number_scores, scores_from_log_probs
from harmjax.evaluate.over_refusal import OVER_REFUSAL_PHRASES, measure_over_refusal, summarize_over_refusal
from harmjax.evaluate.refusal import REFUSAL_PHRASES, is_refusal, refusal_flags, refusal_rate
from harmjax.evaluate.rubric import (
    RubricResult,
    RubricTemplates,
    load_rubric_templates,
    local_judge,
    parse_rubric,
    rubric_score,
    score_rubric,
)
from harmjax.evaluate.selectivity import nll_selectivity, selectivity_from_nll
from harmjax.evaluate.strongreject_finetuned import (
    FinetunedJudge,
    JudgeTemplateError,
    finetuned_probabilities,
    load_finetuned_judge,
    load_template,
    score_finetuned,
)
from harmjax.evaluate.utility import (
    MCItem,
    TriviaItem,
    load_mc_task,
    load_text_corpus,
    load_triviaqa,
    multiple_choice_accuracy,
    normalize_answer,
    perplexity,
    triviaqa_accuracy,
)

__all__ = [
    "EMFormatError", "EMPair", "EMPairFormatError", "EMQuestion", "EMRate", "JudgePrompts", "NumberJudgeError",
    "NumberScores", "PreferenceResult", "RateInterval", "build_trie", "em_rate", "is_misaligned", "judge_answers",
    "load_em_pairs", "load_em_questions", "load_judge_prompts", "misalignment_preference", "number_scores",
    "sample_answers", "scores_from_log_probs", "summarize_em",
    "FinetunedJudge", "JudgeTemplateError", "MCItem", "REFUSAL_PHRASES", "RubricResult", "RubricTemplates",
    "TriviaItem", "finetuned_probabilities", "is_refusal", "load_finetuned_judge", "load_mc_task",
    "load_rubric_templates", "load_template", "load_text_corpus", "load_triviaqa", "local_judge",
    "multiple_choice_accuracy", "nll_selectivity", "OVER_REFUSAL_PHRASES", "measure_over_refusal",
    "summarize_over_refusal", "normalize_answer", "parse_rubric", "perplexity",
    "refusal_flags", "refusal_rate", "rubric_score", "score_finetuned", "score_rubric",
    "selectivity_from_nll", "triviaqa_accuracy",
]
