"""Config overrides for the launcher tests: the same (dotted key, value) list applied to a
ConfigDict in-process, or turned into absl `--config.*` flags for a subprocess. Also the
small prompt files the experiment tests run on, and the comparison of a resumed run's
results with an uninterrupted run's."""

import csv
import json
import math


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


def assert_same_results(expected, got, rel=1e-6, abs_tol=1e-7, skip=("seconds",), where="results"):
    """Asserts two JSON-like results agree everywhere: the same keys (but those in `skip`, e.g.
    wall times and directories, which differ between runs) and lengths; ints, bools, strings
    and None equal; floats within `rel`/`abs_tol` (NaN matches NaN). The message names the
    path of the first difference."""
    if isinstance(expected, dict):
        assert isinstance(got, dict), f"{where}: {got!r} is not a dict"
        keys = {k for k in expected if k not in skip}
        assert keys == {k for k in got if k not in skip}, f"{where}: keys {sorted(keys ^ set(got))} differ"
        for k in sorted(keys, key=str):
            assert_same_results(expected[k], got[k], rel, abs_tol, skip, f"{where}.{k}")
    elif isinstance(expected, (list, tuple)):
        assert isinstance(got, (list, tuple)) and len(got) == len(expected), f"{where}: {got!r} vs {expected!r}"
        for i, (a, b) in enumerate(zip(expected, got)):
            assert_same_results(a, b, rel, abs_tol, skip, f"{where}[{i}]")
    elif isinstance(expected, float) or isinstance(got, float):
        # Counts stay exact (ints below); a float in either makes it a measured value.
        assert isinstance(got, (int, float)) and isinstance(expected, (int, float)) \
            and not isinstance(got, bool) and not isinstance(expected, bool), f"{where}: {got!r} vs {expected!r}"
        if math.isnan(expected) or math.isnan(got):
            assert math.isnan(expected) and math.isnan(got), f"{where}: {got!r} vs {expected!r}"
        else:
            assert math.isclose(got, expected, rel_tol=rel, abs_tol=abs_tol), f"{where}: {got!r} vs {expected!r}"
    else:
        assert type(got) is type(expected) and got == expected, f"{where}: {got!r} vs {expected!r}"
