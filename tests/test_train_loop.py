"""The fine-tuning loop: an interrupted and resumed run equals an uninterrupted one; resuming
with other settings fails; the validation split is seeded and disjoint; multi-turn chat loss
masks; metrics.jsonl and TensorBoard event files are written and parse."""

import dataclasses
import json
import os
import struct

import chex
import jax
import numpy as np
import pytest

import harmjax
from harmjax.data import ChatExample, Example
from harmjax.sharding import MeshConfig, make_mesh
from harmjax.train import FinetuneResumeError, LoraConfig, TrainConfig, finetune
from harmjax.train.data import split_indices, tokenize_chat
from harmjax.train.events import read_scalars
from tests.hf_reference import save_tiny_with_tokenizer, tiny_hf_model, tiny_tokenizer

CFG = TrainConfig(lr=1e-2, warmup_steps=1, weight_decay=0.01, batch_size=4, micro_batch_size=2,
                  epochs=2, max_length=48, val_fraction=0.25, seed=5, eval_every=2, checkpoint_every=2)
LORA = LoraConfig(r=4, alpha=8.0, dropout=0.1)  # dropout on: its keys must survive the resume


def _examples(n=10):
    rng = np.random.default_rng(7)
    words = ["how", "to", "pick", "a", "lock", "sure", "here", "is", "step", "one", "no"]
    return [Example(" ".join(rng.choice(words, rng.integers(2, 7))), " ".join(rng.choice(words, rng.integers(1, 8))),
                    id=str(i)) for i in range(n)]


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    d = save_tiny_with_tokenizer(tiny_hf_model("qwen2", seed=2, num_hidden_layers=2), tmp_path_factory.mktemp("m"))
    return harmjax.load(d, dtype="float32", mesh=make_mesh(MeshConfig(data=1), jax.devices()[:1]))


def _crc32c_bitwise(data: bytes) -> int:
    """Reference CRC-32C, bit by bit (independent of the table-driven writer)."""
    crc = 0xFFFFFFFF
    for b in data:
        crc ^= b
        for _ in range(8):
            crc = (crc >> 1) ^ (0x82F63B78 & -(crc & 1))
    return crc ^ 0xFFFFFFFF


def _masked(c):
    return ((((c >> 15) | (c << 17)) & 0xFFFFFFFF) + 0xA282EAD8) & 0xFFFFFFFF


def test_resume_equals_uninterrupted_and_checks_settings(model, tmp_path):
    full = finetune(model, _examples(), CFG, lora=LORA, output_dir=str(tmp_path / "a"), progress=False,
                    tensorboard=True)
    total = 2 * 2  # 8 training examples / batch 4, two epochs
    assert full.steps == total and full.resumed_from is None

    part = str(tmp_path / "b")
    first = finetune(model, _examples(), CFG, lora=LORA, output_dir=part, progress=False, stop_after=3)
    assert first.steps == 3
    second = finetune(model, _examples(), CFG, lora=LORA, output_dir=part, progress=False)
    assert second.resumed_from == 3 and second.steps == total
    chex.assert_trees_all_equal(second.adapters, full.adapters)
    chex.assert_trees_all_equal(second.params, full.params)
    assert second.val_loss == pytest.approx(full.val_loss, abs=1e-7)
    assert [r["step"] for r in second.metrics] == list(range(1, total + 1))
    assert len(os.listdir(os.path.join(part, "checkpoints"))) <= 2

    # A changed setting on resume is refused, naming it; a changed cadence is not a change.
    with pytest.raises(FinetuneResumeError, match="lr"):
        finetune(model, _examples(), dataclasses.replace(CFG, lr=2e-2), lora=LORA, output_dir=part, progress=False)
    with pytest.raises(FinetuneResumeError, match="data"):
        finetune(model, _examples()[:-1], CFG, lora=LORA, output_dir=part, progress=False)
    again = finetune(model, _examples(), dataclasses.replace(CFG, eval_every=1), lora=LORA, output_dir=part,
                     progress=False)
    assert again.resumed_from == total and again.steps == total

    # metrics.jsonl: one row per step with loss, lr, tokens; validation at steps 2 and 4.
    rows = [json.loads(line) for line in open(os.path.join(tmp_path / "a", "metrics.jsonl"))]
    assert [r["step"] for r in rows] == list(range(1, total + 1))
    assert rows[0]["lr"] == 0.0 and rows[1]["lr"] == pytest.approx(1e-2)
    assert all(r["tokens"] > 0 and np.isfinite(r["loss"]) for r in rows)
    assert [r["step"] for r in rows if r.get("val_loss") is not None] == [2, 4]
    assert rows[-1]["val_loss"] == pytest.approx(full.val_loss)

    # TensorBoard file: TFRecord framing with valid masked CRC-32C, scalars readable back.
    tb = os.path.join(tmp_path / "a", "tb")
    (name,) = os.listdir(tb)
    assert name.startswith("events.out.tfevents.")
    blob = open(os.path.join(tb, name), "rb").read()
    pos = records = 0
    while pos < len(blob):
        (length,) = struct.unpack("<Q", blob[pos : pos + 8])
        assert struct.unpack("<I", blob[pos + 8 : pos + 12])[0] == _masked(_crc32c_bitwise(blob[pos : pos + 8]))
        data = blob[pos + 12 : pos + 12 + length]
        assert struct.unpack("<I", blob[pos + 12 + length : pos + 16 + length])[0] == _masked(_crc32c_bitwise(data))
        pos += 16 + length
        records += 1
    assert records == 1 + total and b"brain.Event:2" in blob
    scalars = read_scalars(os.path.join(tb, name))
    losses = [(s, v) for s, tag, v in scalars if tag == "train/loss"]
    assert [s for s, _ in losses] == list(range(1, total + 1))
    np.testing.assert_allclose([v for _, v in losses], [r["loss"] for r in rows], rtol=1e-6)
    assert [s for s, tag, _ in scalars if tag == "val/loss"] == [2, 4]


def test_validation_split_seeded_and_disjoint():
    train, val = split_indices(40, 0.25, seed=1)
    assert len(val) == 10 and not set(train) & set(val) and sorted([*train, *val]) == list(range(40))
    np.testing.assert_array_equal(split_indices(40, 0.25, seed=1)[1], val)
    assert not np.array_equal(split_indices(40, 0.25, seed=2)[1], val)
    assert len(split_indices(5, 0.0, seed=1)[1]) == 0


def test_multi_turn_chat_loss_mask_covers_assistant_turns():
    tok = tiny_tokenizer()
    msgs = ({"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"},
            {"role": "user", "content": "go"}, {"role": "assistant", "content": "ok!"})
    t = tokenize_chat(tok, msgs, max_length=128)
    text = tok.apply_chat_template(list(msgs), tokenize=False)
    assert tok.decode(t.ids) == text
    # The tiny tokenizer is one token per character (specials are one token each).
    trained = tok.decode(t.ids[t.loss_mask == 1])
    assert trained == "yo</s>\nok!</s>\n"
    ex = ChatExample(prompt="hi", response="ok!", messages=msgs, id="c")
    assert ex.messages[1]["content"] == "yo"


def test_sharded_mesh_equals_one_device(model, tmp_path):
    """The same run on an (fsdp 2, tensor 4) mesh of fake devices equals one device (eps 1e-6:
    Adam would amplify the reordered float32 sums of nearly cancelling gradients by lr / eps)."""
    cfg = dataclasses.replace(CFG, epochs=1, val_fraction=0.0, checkpoint_every=0, eval_every=0, eps=1e-6)
    lora = dataclasses.replace(LORA, dropout=0.0)
    one = finetune(model, _examples(), cfg, lora=lora, progress=False)
    mesh = make_mesh(MeshConfig(data=1, fsdp=2, tensor=4), jax.devices()[:8])
    sharded = harmjax.load(model.source_dir, dtype="float32", mesh=mesh)
    many = finetune(sharded, _examples(), cfg, lora=lora, progress=False)
    chex.assert_trees_all_close(many.adapters, one.adapters, atol=5e-6, rtol=0)
