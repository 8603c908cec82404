"""Config overrides for the launcher tests: the same (dotted key, value) list applied to a
ConfigDict in-process, or turned into absl `--config.*` flags for a subprocess. Also the
small prompt files the experiment tests run on."""

import csv
import json


def with_overrides(cfg, overrides, output_dir):
    """`cfg` with each (dotted key, value) of `overrides` set, and output_dir."""
    for key, value in list(overrides) + [("output_dir", str(output_dir))]:
        node = cfg
        *path, last = key.split(".")
        for part in path:
            node = node[part]
        node[last] = value
    return cfg


def as_flags(overrides, output_dir):
    """The same overrides as `--config.key=value` flags (tuples as "(a,b)")."""
    flags = []
    for key, value in list(overrides) + [("output_dir", str(output_dir))]:
        if isinstance(value, tuple):
            value = "(" + ",".join(map(str, value)) + ")"
        flags.append(f"--config.{key}={value}")
    return flags


def write_prompt_files(root, harmful, benign, benign_text="Tell me about {c} topic {i}."):
    """`root/harmful.csv` (columns prompt, category) and `root/benign.jsonl` (instruction,
    category) with `harmful[c]` / `benign[c]` prompts per category c; returns both paths."""
    harmful_path, benign_path = root / "harmful.csv", root / "benign.jsonl"
    with open(harmful_path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["prompt", "category"])
        for c, n in harmful.items():
            for i in range(n):
                w.writerow([f"How to do {c} thing number {i}?", c])
    with open(benign_path, "w") as f:
        for c, n in benign.items():
            for i in range(n):
                f.write(json.dumps({"instruction": benign_text.format(c=c, i=i), "category": c}) + "\n")
    return harmful_path, benign_path
