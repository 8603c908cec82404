"""The refusal-tuning stage (`harmjax.experiments.refusal.run`, configs/refusal_embedded.py) on a
tiny random model: it runs end to end and writes a loadable merged model; held-out prompts
(the main job's and its own) are never trained on; a second call reuses the model without
training; a run interrupted during training resumes from its checkpoint and ends with the same
weights. Also the packaged refusal texts."""

import json
import os

import numpy as np
import pytest

from configs.refusal_embedded import get_config
from harmjax.data.refusal_set import load_refusals
from harmjax.data.records import DatasetFormatError
from harmjax.experiments.core.prompt_sets import load_benign_prompts, load_harmful_prompts, split_per_category
from harmjax.experiments.refusal import run as refusal_model
from tests.config_overrides import with_overrides, write_prompt_files
from tests.hf_reference import save_tiny_with_tokenizer, tiny_hf_model

OVERRIDES = [
    ("mesh.data", 2), ("mesh.tensor", 4),  # the 8 fake CPU devices
    ("prompts.prompt_key", "prompt"), ("prompts.per_category", 6), ("prompts.heldout_fraction", 0.34),
    ("prompts.benign_per_category", 4), ("prompts.benign_heldout_fraction", 0.5),
    ("data.harmful_per_category", 0), ("data.eval_fraction", 0.2), ("data.benign_eval_fraction", 0.2),
    ("data.benign_openings", 4),  # exercised here; off in the embedded config
    ("answers.max_new_tokens", 8), ("answers.batch_size", 8), ("answers.chunk", 8),
    ("lora.r", 4), ("lora.alpha", 8.0),
    ("train.lr", 1e-2), ("train.batch_size", 4), ("train.micro_batch_size", 2), ("train.max_steps", 4),
    ("train.max_length", 128), ("train.warmup_steps", 1), ("train.checkpoint_every", 1),
    ("evaluation.max_new_tokens", 6), ("evaluation.generation_batch_size", 8), ("evaluation.batch_size", 8),
    ("evaluation.max_length", 128), ("evaluation.refusal_min_words", 0),
    ("over_refusal.safe_per_kind", 1), ("over_refusal.max_new_tokens", 4), ("over_refusal.batch_size", 16),
]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("refusal")
    model_dir = save_tiny_with_tokenizer(tiny_hf_model("llama", seed=3), root / "model")
    harmful, benign = write_prompt_files(root, {"crime": 9, "hate": 9}, {"facts": 8, "code": 4})
    refusals = root / "refusals.jsonl"  # short ones: the tiny tokenizer spends a token per character
    refusals.write_text("".join(json.dumps({"id": f"r{i}", "text": t}) + "\n"
                                for i, t in enumerate(["I can't help.", "Sorry, no.", "I won't do that."])))
    overrides = OVERRIDES + [("model", model_dir), ("prompts.harmful", str(harmful)), ("prompts.benign", str(benign)),
                             ("data.refusals", str(refusals))]
    return root, overrides


def _config(overrides, output_dir):
    return with_overrides(get_config(), overrides, output_dir)


@pytest.fixture(scope="module")
def finished(setup):
    root, overrides = setup
    out = root / "run"
    return out, refusal_model.run_refusal_tuning(_config(overrides, out), progress=False)


def _read_jsonl(path):
    return [json.loads(line) for line in open(path) if line.strip()]


def test_packaged_refusals_load_and_vary(tmp_path):
    texts = [r.text for r in load_refusals()]
    assert len(texts) >= 40 and len(set(texts)) == len(texts)
    openings = {" ".join(t.split()[:2]) for t in texts}
    assert len(openings) >= 10  # not one sentence in many copies
    assert all(3 <= len(t.split()) <= 40 for t in texts)
    styles = {r.style for r in load_refusals()}
    assert {"apology", "direct", "reason", "alternative"} <= styles
    bad = tmp_path / "dup.jsonl"
    bad.write_text('{"id": "a", "text": "No."}\n{"id": "b", "text": "no. "}\n')
    with pytest.raises(DatasetFormatError, match="line 2"):
        load_refusals(str(bad))


def test_end_to_end(setup, finished):
    root, overrides = setup
    out, m = finished
    for name in ("report.md", "metrics.json", "prompts.json"):
        assert (out / name).is_file(), name
    # Each model's rates, recomputed from the answers its evaluation stored (one sample per
    # held-out prompt, in order) with the keyword judge: equal, so an empty or swapped set fails.
    from harmjax.evaluate.refusal import is_refusal

    E = _config(overrides, out).evaluation
    prompts = json.load(open(out / "prompts.json"))
    assert prompts["main_heldout"] and set(prompts["main_heldout"]) <= set(prompts["heldout"])
    for model in refusal_model.MODELS:
        row = m["table"][model]
        (stage,) = (out / "cache").glob(f"evaluate_{model}-*")
        samples = json.load(open(stage / "results.json"))["samples"]
        assert [s["id"] for s in samples] == prompts["heldout"], model
        plain = [is_refusal(s["answer"], min_words=E.refusal_min_words) for s in samples]
        phrase = [is_refusal(s["answer"], min_words=0) for s in samples]
        attacked = [is_refusal(s["attacked_answer"], min_words=E.refusal_min_words) for s in samples]
        assert all(s["attacked_answer"].startswith(E.attack_prefix) for s in samples)
        main = [r for r, s in zip(plain, samples) if s["id"] in prompts["main_heldout"]]
        margins = np.array([s["logprob_margin"] for s in samples])
        assert row["refusal_rate"] == sum(plain) / len(plain), model
        assert row["refusal_rate_phrase"] == sum(phrase) / len(phrase), model
        assert row["refusal_rate_main_heldout"] == pytest.approx(sum(main) / len(main), abs=1e-12), model
        assert row["attack_harmful_rate"] == pytest.approx(1 - sum(attacked) / len(attacked), abs=1e-12), model
        assert row["logprob_refusal_fraction"] == (margins > 0).sum() / len(margins), model
        assert row["logprob_margin_mean"] == pytest.approx(margins.mean(), rel=1e-12), model
        assert np.isfinite(row["benign_nll"]) and np.isfinite(row["logprob_margin_mean"])
    assert set(m["targets"]) >= {"refusal_rate", "logprob_refusal_fraction", "benign_nll_rise", "all_met"}
    # Over-refusal of both models: one safe prompt per kind, the report's section.
    assert list(m["over_refusal"]) == list(refusal_model.MODELS)
    assert all(r["over_refusal"]["n"] == 9 for r in m["over_refusal"].values())
    assert "## Over-refusal" in open(out / "report.md").read()
    assert m["training"]["steps"] == 4 and m["training"]["resumed_from"] is None
    # The merged model loads as a model source and differs from the base.
    import harmjax
    from harmjax.tree import flatten

    tuned_dir = m["model"]["refusal_tuned"]
    assert tuned_dir == refusal_model.ensure_refusal_model(_config(overrides, out), progress=False)
    base, tuned = harmjax.load(dict(overrides)["model"]), harmjax.load(tuned_dir)
    assert tuned.tokenizer is not None and tuned.config == base.config
    a, b = flatten(base.params), flatten(tuned.params)
    assert any(not np.array_equal(np.asarray(a[k]), np.asarray(b[k])) for k in a)
    # The tuned model finds the refusals it was trained on more likely than the base does.
    from harmjax.data.records import Example
    from harmjax.inference import response_nll

    trained = _read_jsonl(next((out / "cache").glob("tune-*/training_data.jsonl")))
    refusal_rows = [Example(prompt=r["prompt"], response=r["response"]) for r in trained if r["id"].startswith("h")]
    nll = [response_nll(x, refusal_rows, text_format="raw", max_length=128, num_buckets=1).mean() for x in (base, tuned)]
    assert nll[1] < nll[0] - 0.1, nll


def test_heldout_prompts_never_trained_on(setup, finished):
    root, overrides = setup
    out, m = finished
    cfg = _config(overrides, out)
    P = cfg.prompts
    # The main job's held-out prompts, derived here as run_experiment derives them.
    _, main_held = split_per_category(load_harmful_prompts(P.harmful, P.prompt_key, P.category_key),
                                      P.per_category, P.heldout_fraction, cfg.prompts_seed)
    _, main_held_b = split_per_category(load_benign_prompts(P.benign, P.benign_prompt_key),
                                        P.benign_per_category, P.benign_heldout_fraction, cfg.prompts_seed)
    assert main_held and main_held_b
    trained = _read_jsonl(next((out / "cache").glob("tune-*/training_data.jsonl")))
    texts = "\n".join(r["prompt"] for r in trained)
    prompts = json.load(open(out / "prompts.json"))
    held = set(prompts["heldout"]) | set(prompts["benign_heldout"])
    assert {e.id for e in main_held + main_held_b} <= held
    assert len(prompts["heldout"]) > len(main_held)  # plus the stage's own held-out share
    assert not held & {r["id"] for r in trained}
    all_prompts = load_harmful_prompts(P.harmful, P.prompt_key) + load_benign_prompts(P.benign, P.benign_prompt_key)
    for e in all_prompts:
        assert (e.prompt in texts) == (e.id not in held and e.id in {r["id"] for r in trained}), e.id
    # Harmful prompts are paired with the given refusals, benign ones with the model's answers.
    refusals = {r.text for r in load_refusals(cfg.data.refusals)}
    harmful_rows = [r for r in trained if r["id"].startswith("h")]
    assert harmful_rows and all(any(t in r["response"] for t in refusals) for r in harmful_rows)
    assert any(r["id"].startswith("b") for r in trained)
    # An experiment holding out other prompts (another seed) is refused.
    from configs.embedded import get_config as experiment_config

    other = with_overrides(experiment_config(), [(k, v) for k, v in overrides if k.startswith("prompts.")] +
                           [("seed", 1)], out)
    with pytest.raises(ValueError, match="held-out prompts are in the training set"):
        refusal_model.ensure_refusal_model(cfg, progress=False, experiment_cfg=other)


def test_second_call_reuses_the_model(setup, finished, monkeypatch):
    root, overrides = setup
    out, m = finished
    tuned = m["model"]["refusal_tuned"]
    stamps = {f: os.stat(os.path.join(tuned, f)).st_mtime_ns for f in os.listdir(tuned)}
    calls = []
    import harmjax.train
    import harmjax.train.loop

    def no_training(*args, **kwargs):
        calls.append(1)
        raise AssertionError("trained again")

    monkeypatch.setattr(harmjax.train, "finetune", no_training)
    monkeypatch.setattr(harmjax.train.loop, "finetune", no_training)
    again = refusal_model.run_refusal_tuning(_config(overrides, out), progress=False)
    assert not calls
    assert all(v["cached"] for v in again["timings"].values())
    assert {f: os.stat(os.path.join(tuned, f)).st_mtime_ns for f in os.listdir(tuned)} == stamps
    assert again["table"] == m["table"]


class _Interrupted(Exception):
    pass


def test_interrupted_training_resumes(setup, finished, tmp_path, monkeypatch):
    root, overrides = setup
    _, m = finished
    import harmjax.train.loop as loop

    saved, real_save = [], loop._save

    def save_then_stop(root_dir, state, settings, position):
        real_save(root_dir, state, settings, position)
        saved.append(int(np.asarray(state["step"])))
        if saved[-1] == 2 and stop[0]:
            raise _Interrupted

    stop = [True]
    monkeypatch.setattr(loop, "_save", save_then_stop)
    cfg = _config(overrides, tmp_path / "run")
    with pytest.raises(_Interrupted):
        refusal_model.ensure_refusal_model(cfg, progress=False)
    assert saved == [1, 2] and not list((tmp_path / "run" / "cache").glob("tune-*/DONE.json"))
    stop[0] = False
    path = refusal_model.ensure_refusal_model(cfg, progress=False)
    assert saved == [1, 2, 3, 4]  # continued at step 3, not restarted
    log = _read_jsonl(next((tmp_path / "run" / "cache").glob("tune-*/train/metrics.jsonl")))
    assert [r["step"] for r in log] == [1, 2, 3, 4]
    # Same weights as the uninterrupted run of the same settings.
    import harmjax
    from harmjax.tree import flatten

    a, b = flatten(harmjax.load(path).params), flatten(harmjax.load(m["model"]["refusal_tuned"]).params)
    for k in a:
        np.testing.assert_allclose(np.asarray(a[k]), np.asarray(b[k]), rtol=1e-6, atol=1e-6, err_msg=k)


def test_opening_logprobs_match_a_full_forward(setup):
    """The stem-sharing log p(opening | prompt) equals log-softmax sums from one unpadded forward
    pass per (prompt, opening)."""
    import jax
    import jax.numpy as jnp

    import harmjax
    from harmjax.data.records import Example
    from harmjax.generate.prompts import prefix_token_ids, prompt_token_ids
    from harmjax.experiments.refusal.eval import opening_logprobs

    root, overrides = setup
    model = harmjax.load(dict(overrides)["model"])
    prompts = [Example(prompt=p, id=str(i)) for i, p in enumerate(["How do I do it?", "Tell me a story about a cat."])]
    openings = ["I'm sorry", "I cannot", "Sorry", "Sure"]  # "I'm sorr" also scores "I cannot" and "Sorry"
    got = opening_logprobs(model, model.params, prompts, openings, batch_size=8)
    # Every (prompt, opening) sequence right-padded into one batch: one compilation, and a
    # causal model's logits at real positions do not see the padding after them.
    seqs = [(i, j, prompt_token_ids(model.tokenizer, e.prompt), prefix_token_ids(model.tokenizer, o))
            for i, e in enumerate(prompts) for j, o in enumerate(openings)]
    width = max(len(p) + len(o) for _, _, p, o in seqs)
    ids = np.zeros((len(seqs), width), np.int32)
    for row, (_, _, p, o) in enumerate(seqs):
        ids[row, : len(p) + len(o)] = p + o
    lp = np.asarray(jax.nn.log_softmax(harmjax.forward(model.params, model.config, jnp.asarray(ids)), axis=-1))
    for row, (i, j, p, o) in enumerate(seqs):
        want = sum(float(lp[row, len(p) - 1 + t, tok]) for t, tok in enumerate(o))
        assert got[i, j] == pytest.approx(want, abs=1e-4), (prompts[i].prompt, openings[j])
