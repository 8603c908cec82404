"""Data: tables of (prompt, response, category) records, calibration batches for attribution,
and loaders for the datasets the method uses (AdvBench, HEx-PHI, StrongREJECT, Alpaca, chat JSONL)."""

from harmjax.data.loaders import (
    ChatExample,
    load_advbench,
    load_alpaca,
    load_chat_jsonl,
    load_dataset_by_name,
    load_hexphi,
    load_strongreject,
    parse_category_spec,
)
from harmjax.data.loaders import filter_categories as filter_by_spec
from harmjax.data.benign_set import CATEGORIES as BENIGN_CATEGORIES, load_benign_instructions, split_benign
from harmjax.data.over_refusal_set import OverRefusalPrompt, load_over_refusal, over_refusal_subset
from harmjax.data.records import DatasetFormatError, Example, filter_categories, read_records, sample, to_examples

__all__ = [
    "BENIGN_CATEGORIES", "load_benign_instructions", "split_benign",
    "OverRefusalPrompt", "load_over_refusal", "over_refusal_subset",
    "ChatExample", "DatasetFormatError", "Example", "filter_by_spec", "filter_categories", "load_advbench",
    "load_alpaca", "load_chat_jsonl", "load_dataset_by_name", "load_hexphi", "load_strongreject",
    "parse_category_spec", "read_records", "sample", "to_examples",
]
