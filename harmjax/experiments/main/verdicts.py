"""The main experiment's measures and verdicts: report rows of the masks (deltas against the
unpruned model), the transfer matrix, and claims 1 and 2 (with claim 2's benign baselines),
each decided by the fixed rules below, which the report states so a reader can check them.
"""

from __future__ import annotations

import math
from typing import Any

# The rules behind the report's verdicts (stated in the report too).
SELECTIVE_RATIO = 2.0  # harm NLL must rise >= 2x benign NLL, and >= 2x the random mask's harm rise
MIN_HARM_RISE = 0.05  # nats/token: smaller rises are noise at these sample sizes
OVERLAP_RATIO = 2.0  # category-category Jaccard >= 2x category-benign Jaccard
TRANSFER_RATIO = 0.5  # off-diagonal harm rise >= half the diagonal's
# A baseline's benign NLL rise matches a target within +-25% of it (of MIN_HARM_RISE when the target is smaller).
MATCH_TOLERANCE = 0.25


def _delta(r: dict, base: dict, key: str) -> float | None:
    if key not in r or key not in base or r[key] is None or base[key] is None:
        return None
    return r[key] - base[key]


def _mean(xs) -> float | None:
    xs = [x for x in xs if x is not None and math.isfinite(x)]
    return sum(xs) / len(xs) if xs else None


def mask_row(e, r, base) -> dict[str, Any]:
    """A report row of mask entry `e` with its metrics `r`, deltas against the unpruned `base`."""
    d_h, d_b = _delta(r, base, "harm_nll"), _delta(r, base, "benign_nll")
    return {
        "name": e["name"], "q": e["q"], "p": e["p"], "pruned": e["total"], "fraction": e["fraction"],
        "fraction_params": e["fraction_params"], "harm_nll": r["harm_nll"], "benign_nll": r.get("benign_nll"),
        "benign_ppl": r.get("benign_ppl"), "d_harm": d_h, "d_benign": d_b,
        "selectivity": (d_h / d_b) if d_h is not None and d_b and d_b > 0 else None,
        "refusal_rate": r.get("refusal_rate"), "strongreject": r.get("strongreject"),
        **{k: v for k, v in r.items() if k.startswith("mc_")},
    }


def sweep_rows(masks, results, kind: str) -> list[dict[str, Any]]:
    """One row per mask of `kind` ("harm" or "random"), sorted by q, with deltas vs unpruned."""
    base = results["unpruned"]
    return [mask_row(e, results[e["name"]], base)
            for e in sorted((m for m in masks if m["kind"] == kind), key=lambda m: m["q"])]


def headline_mask(masks, q: float):
    """The harm mask whose q is nearest `q` on a log scale (the report's headline), or None."""
    return min((m for m in masks if m["kind"] == "harm"), key=lambda m: abs(math.log(m["q"] / q)), default=None)


def transfer_matrix(masks, results) -> dict[str, Any]:
    """Rows: the mask of category A; columns: category B; cells: rise of B's held-out harmful
    NLL when A's mask is applied (B's held-out items are never in A's pruning data). Also each
    row's benign NLL rise, when measured (evaluation.category_benign)."""
    base = results["unpruned"]["harm_nll_per_category"]
    rows = sorted((m for m in masks if m["kind"] == "category"), key=lambda m: m["name"])
    cols = sorted(base)
    matrix = [[results[m["name"]]["harm_nll_per_category"].get(c, float("nan")) - base[c] for c in cols] for m in rows]
    benign = [_delta(results[m["name"]], results["unpruned"], "benign_nll") for m in rows]
    return {"rows": [m["name"] for m in rows], "cols": cols, "delta_harm_nll": matrix, "delta_benign_nll": benign}


def claim1(sweep, random) -> dict[str, Any]:
    """Claim 1 (a compact set of weights): the smallest q whose mask raises harmful NLL by at
    least MIN_HARM_RISE, by SELECTIVE_RATIO x the benign rise, and by SELECTIVE_RATIO x the
    random control's harm rise."""
    rnd = {r["q"]: r for r in random}
    best = next((r for r in sweep if claim1_holds(r, rnd.get(r["q"]))), None)
    strongest = max(sweep, key=lambda r: r["d_harm"] if r["d_harm"] is not None else -1e9) if sweep else None
    return {"supported": best is not None, "smallest_selective": best, "strongest": strongest,
            "rule": f"harm NLL rise >= {MIN_HARM_RISE} nats/token, >= {SELECTIVE_RATIO}x the benign NLL rise "
                    f"and >= {SELECTIVE_RATIO}x the same-size random mask's harm NLL rise"}


def claim1_holds(r, ctrl) -> bool:
    """Claim 1's rule on one sweep row `r` and its random control row `ctrl` (or None)."""
    return (r["d_harm"] is not None and r["d_harm"] >= MIN_HARM_RISE
            and (r["d_benign"] is None or r["d_harm"] >= SELECTIVE_RATIO * max(r["d_benign"], 0.0))
            and (ctrl is None or r["d_harm"] >= SELECTIVE_RATIO * max(ctrl["d_harm"] or 0.0, 0.0)))


def claim2(overlap, transfer) -> dict[str, Any]:
    """Claim 2 (shared across harm types): overlap and transfer, each against a stated rule."""
    labels, m = overlap["labels"], overlap["matrix"]
    cats = [i for i, l in enumerate(labels) if l != "benign"]
    b = labels.index("benign") if "benign" in labels else None
    cat_cat = _mean([m[i][j] for i in cats for j in cats if i < j])
    cat_ben = _mean([m[i][b] for i in cats]) if b is not None else None
    t = transfer["delta_harm_nll"]
    diag = _mean([t[i][transfer["cols"].index(c)] for i, c in enumerate(transfer["rows"]) if c in transfer["cols"]])
    off = _mean([t[i][j] for i, c in enumerate(transfer["rows"]) for j, d in enumerate(transfer["cols"]) if c != d])
    benign = _mean(transfer.get("delta_benign_nll") or [])
    overlap_ok = cat_cat is not None and cat_ben is not None and cat_cat >= OVERLAP_RATIO * cat_ben and cat_cat > 0
    transfer_ok = (diag is not None and off is not None and diag >= MIN_HARM_RISE and off >= TRANSFER_RATIO * diag
                   and (benign is None or off >= SELECTIVE_RATIO * max(benign, 0.0)))
    return {"mean_jaccard_category_pairs": cat_cat, "mean_jaccard_category_benign": cat_ben,
            "overlap_supported": overlap_ok, "transfer_diagonal": diag, "transfer_off_diagonal": off,
            "transfer_benign": benign, "transfer_supported": transfer_ok,
            "rule": f"mean category-pair Jaccard >= {OVERLAP_RATIO}x mean category-benign Jaccard; mean off-diagonal "
                    f"harm NLL rise >= {TRANSFER_RATIO}x the diagonal's (which must be >= {MIN_HARM_RISE}) and, where "
                    f"measured, >= {SELECTIVE_RATIO}x the category masks' mean benign NLL rise"}


def cost_matched(cost: float | None, target: float | None) -> bool:
    """Whether a benign NLL rise `cost` matches `target` within MATCH_TOLERANCE (relative to
    the target, or to MIN_HARM_RISE when the target is smaller: rises below it are noise)."""
    if cost is None or target is None or not (math.isfinite(cost) and math.isfinite(target)):
        return False
    return abs(cost - target) <= MATCH_TOLERANCE * max(abs(target), MIN_HARM_RISE)


def per_unit(d_harm: float | None, d_benign: float | None) -> float | None:
    """Harmful-NLL rise per unit benign-NLL rise. Benign rises below MIN_HARM_RISE count as
    MIN_HARM_RISE (the noise floor), so a mask that barely touches benign text gets a large
    but bounded ratio rather than a division by ~0."""
    if d_harm is None or d_benign is None or not (math.isfinite(d_harm) and math.isfinite(d_benign)):
        return None
    return d_harm / max(d_benign, MIN_HARM_RISE)


def baseline_rows(masks, results, baselines, benign_jaccard: float | None) -> list[dict[str, Any]]:
    """Rows of the benign-data mask and of every benign \\ retain baseline mask (by q), each
    with its role ("benign-data mask", "same q", "matched", "search"), the mean Jaccard with
    the category masks, and the harmful-NLL rise per unit benign-NLL rise."""
    base = results["unpruned"]
    rows = [{**mask_row(e, results[e["name"]], base), "role": "benign-data mask", "jaccard_category": benign_jaccard}
            for e in masks if e["kind"] == "benign"]
    for e in sorted((baselines or {}).get("masks", []), key=lambda e: e["q"]):
        roles = [role for role in ("same_q", "matched") if baselines[role] == e["name"]]
        rows.append({**mask_row(e, results[e["name"]], base), "role": ", ".join(r.replace("_", " ") for r in roles)
                     or "search", "jaccard_category": e["jaccard_category"]})
    for r in rows:
        r["per_unit"] = per_unit(r["d_harm"], r["d_benign"])
    return rows


def _brief(row) -> dict[str, Any] | None:
    keys = ("name", "q", "pruned", "d_harm", "d_benign", "per_unit", "jaccard_category", "refusal_rate")
    return None if row is None else {k: row.get(k) for k in keys}


def claim2_baselines(harm, benign, same_q, matched, category_jaccard: float | None) -> dict[str, Any]:
    """Claim 2 against the benign baselines (rows of `baseline_rows`; `harm` is the headline
    harm mask's sweep row, each may be None when not measured):

    - overlap_vs_baseline_supported: the mean category-pair Jaccard `category_jaccard` is
      >= OVERLAP_RATIO x the mean Jaccard of the category masks with the same-procedure
      baseline at category_q (`same_q`); None when either is missing.
    - distinct_supported: at matched benign cost (`matched`'s benign NLL rise within
      MATCH_TOLERANCE of `harm`'s), the harm mask raises harmful NLL by >= MIN_HARM_RISE and
      its harmful rise per unit benign rise is >= SELECTIVE_RATIO x the baseline's; None (not
      tested) when no baseline matched.
    The benign-data mask (`benign`, top-q with no T_p) is reported beside them, no verdict.
    """
    same_j = same_q.get("jaccard_category") if same_q else None
    overlap_ok = None
    if same_j is not None and category_jaccard is not None:
        overlap_ok = category_jaccard > 0 and category_jaccard >= OVERLAP_RATIO * same_j
    matched_ok = bool(harm and matched and cost_matched(matched["d_benign"], harm["d_benign"]))
    distinct = None
    if matched_ok:
        h, b = per_unit(harm["d_harm"], harm["d_benign"]), per_unit(matched["d_harm"], matched["d_benign"])
        distinct = (harm["d_harm"] is not None and harm["d_harm"] >= MIN_HARM_RISE and h is not None
                    and b is not None and h >= SELECTIVE_RATIO * max(b, 0.0))
    # The share of the benign-data mask inside T_p(retain): T_q(benign) minus the same-q baseline
    # T_q(benign) \ T_p(retain) (both top-q of the same scores, so the baseline is a subset).
    in_retain = None
    if benign and same_q and benign["q"] == same_q["q"] and benign["pruned"]:
        in_retain = 1.0 - same_q["pruned"] / benign["pruned"]
    harm_brief = _brief(harm)
    if harm_brief is not None:
        harm_brief["per_unit"] = per_unit(harm["d_harm"], harm["d_benign"])
    return {
        "benign_mask": _brief(benign), "harm_mask": harm_brief, "baseline_same_q": _brief(same_q),
        "baseline_matched": _brief(matched), "benign_mask_in_retain": in_retain,
        "overlap_vs_baseline_supported": overlap_ok,
        "cost_matched": matched_ok, "distinct_supported": distinct,
        "baseline_rule": (
            f"baseline B_q = T_q(benign signed SNIP) \\ T_p(retain), the harm masks' procedure on benign answers; "
            f"overlap: mean category-pair Jaccard >= {OVERLAP_RATIO}x the category masks' mean Jaccard with B at "
            f"q=category_q; distinct: with B at the searched q whose benign NLL rise is within "
            f"{MATCH_TOLERANCE:.0%} of the headline harm mask's, the harm mask's harmful NLL rise is >= "
            f"{MIN_HARM_RISE} and its harmful rise per unit benign rise (benign rises below {MIN_HARM_RISE} count "
            f"as {MIN_HARM_RISE}) is >= {SELECTIVE_RATIO}x B's; not tested when no searched q matches"),
    }
