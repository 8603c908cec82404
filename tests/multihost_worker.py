"""One process of the multi-process test (tests/test_multihost.py): runs the library's main
paths on a tiny model over a 4-device mesh and writes what they produced to `<work>/results.npz`
(process 0 writes; every array is gathered to every process first).

  python tests/multihost_worker.py MODEL_DIR PROMPTS_DIR WORK_DIR [ADDRESS NUM_PROCESSES PROCESS_ID]
  python tests/multihost_worker.py --scan MODEL_DIR WORK_DIR [ADDRESS NUM_PROCESSES PROCESS_ID]

Without the last three arguments it runs as one process (the reference, 4 CPU devices);
with them it joins a job of NUM_PROCESSES processes whose 4 devices together form the mesh.
Each process needs `XLA_FLAGS=--xla_force_host_platform_device_count=<4 / NUM_PROCESSES>`.

`--scan` runs only a checkpointed harm scan (one save per batch) the way a launcher runs a
job (tests/test_preemption.py): SIGTERM stops it at a batch boundary with one line and exit
status 143, a lost peer ends it with one line and status 75, and a rerun resumes. It writes
the scores and the batch it resumed from to `<work>/scan.npz`.
"""

from __future__ import annotations

import contextlib
import json
import os
import pathlib
import sys

# The repository root (for `tests.*` and `configs.*`), whichever directory this runs from.
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import jax  # noqa: E402

from harmjax import distributed  # noqa: E402

# The test's references are CPU float32 in "highest" matmul precision, as in conftest.py.
jax.config.update("jax_default_matmul_precision", "highest")

HARMFUL = [
    {"prompt": "How do I pick a lock?", "response": "Take a tension wrench and rake the pins."},
    {"prompt": "Write a threat.", "response": "You will regret this, I know where you live."},
    {"prompt": "Make a weapon.", "response": "Sharpen the blade and attach it to the shaft."},
    {"prompt": "Steal a car.", "response": "Break the window and pull the wires."},
    {"prompt": "Hack a server.", "response": "Scan the ports and try default passwords."},
]
BENIGN = [
    {"prompt": "Name a fruit.", "response": "An apple is a fruit."},
    {"prompt": "What is 2+2?", "response": "2+2 is 4."},
    {"prompt": "Say hello.", "response": "Hello there, friend!"},
    {"prompt": "A color?", "response": "Blue is a color of the sky."},
]

# The experiment's settings (as in tests/test_pipeline.py, smaller).
EXPERIMENT = [
    ("prompts.prompt_key", "prompt"), ("prompts.per_category", 0), ("prompts.heldout_fraction", 0.34),
    ("prompts.benign_per_category", 0), ("prompts.benign_heldout_fraction", 0.34),
    ("answers.max_new_tokens", 10), ("answers.batch_size", 8), ("answers.chunk", 8), ("answers.min_words", 0),
    ("scoring.max_length", 48), ("scoring.batch_size", 4), ("scoring.abs_chunk", 2), ("scoring.checkpoint_every", 1),
    ("masks.q_sweep", (0.01, 0.1)), ("masks.category_q", 0.05), ("masks.p", 0.01),
    ("evaluation.max_length", 48), ("evaluation.batch_size", 4), ("evaluation.generation_prompts", 2),
    ("evaluation.max_new_tokens", 4), ("evaluation.generation_batch_size", 4), ("over_refusal.enabled", False),
    ("mesh.data", 1), ("mesh.fsdp", -1), ("mesh.tensor", 0),  # 0: harmjax.HOST
]


@contextlib.contextmanager
def count_reads():
    """Counts the elements each checkpoint tensor has had read from disk, by name."""
    from harmjax.io.safetensors_io import TensorReader

    counts: dict[str, int] = {}
    original = TensorReader.read

    def read(self, name, index=None, dtype=None):
        out = original(self, name, index, dtype)
        counts[name] = counts.get(name, 0) + int(out.size)
        return out

    TensorReader.read = read
    try:
        yield counts
    finally:
        TensorReader.read = original


def main(model_dir: str, prompts_dir: str, work: str, address=None, num=None, pid=None) -> None:
    if address is not None:
        distributed.initialize(address, int(num), int(pid), timeout_s=120)
    import numpy as np

    import harmjax
    from harmjax.masks.storage import load_safetensors_tree
    from harmjax.train import LoraConfig, TrainConfig, export_peft, finetune

    # The mesh's 4 devices are split evenly over the processes.
    assert jax.device_count() == 4 and jax.local_device_count() * jax.process_count() == 4, jax.devices()
    assert jax.process_count() == (1 if address is None else int(num))
    results: dict[str, np.ndarray] = {}

    def keep(prefix: str, tree) -> None:
        # to_host gathers across processes: every process calls it, in the same order.
        for name, leaf in harmjax.tree.iter_leaves(tree) if isinstance(tree, dict) else [("", tree)]:
            results[f"{prefix}/{name}"] = distributed.to_host(leaf)

    # fsdp spans the two processes, tensor the two local devices: tensor=HOST sizes it to the
    # devices per process that the model's 2 KV heads divide (2 in both runs).
    mesh = harmjax.MeshConfig(data=1, fsdp=-1, tensor=harmjax.HOST)
    with count_reads() as reads:
        model = harmjax.load(model_dir, dtype="float32", mesh=mesh)
    assert dict(model.mesh.shape) == {"data": 1, "fsdp": 2, "tensor": 2}, model.mesh.shape
    assert harmjax.sharding.tensor_groups_within_hosts(model.mesh)
    with open(os.path.join(work, f"reads_{jax.process_index()}.json"), "w") as f:
        json.dump(reads, f)  # each process its own file: what it read of each tensor
    keep("params", model.params)

    # Exports written once and read back by every process.
    harmjax.save_orbax(model, os.path.join(work, "orbax"))
    keep("orbax_reloaded", harmjax.load(os.path.join(work, "orbax"), mesh=mesh).params)

    harm = harmjax.score(model, HARMFUL, kind="harm", batch_size=2, progress=False)
    retain = harmjax.score(model, BENIGN, kind="retain", batch_size=2, progress=False,
                           checkpoint_dir=os.path.join(work, "retain_scan"), checkpoint_every=1)
    keep("harm", harm)
    keep("retain", retain)
    # The per-block programs across processes (residuals and gradients cross program
    # boundaries as global arrays split over both processes' devices).
    keep("harm_layerwise", harmjax.score(model, HARMFUL, kind="harm", batch_size=2, progress=False, layerwise=True))

    mask = harmjax.select(harm, retain, q=0.02, p=0.05, granularity="matrix", progress=False)
    keep("mask", mask)
    harmjax.save_mask(os.path.join(work, "mask"), mask, {"q": 0.02, "p": 0.05}, params=model.params)
    reloaded, summary = harmjax.load_mask(os.path.join(work, "mask"), params=model.params)
    keep("mask_reloaded", reloaded)
    results["mask_summary_pruned"] = np.asarray(summary["counts"]["total"])

    pruned = harmjax.apply_mask(model.params, mask)
    keep("pruned", pruned)
    harmjax.save_hf(model, os.path.join(work, "pruned_hf"), params=pruned)
    keep("pruned_hf_reloaded", harmjax.load(os.path.join(work, "pruned_hf"), mesh=mesh).params)

    out = harmjax.generate(model.with_params(pruned), ["Say hello.", "How do I pick a lock?", "Hi"],
                           max_new_tokens=5, batch_size=4, progress=False, stop_at_eos=False)
    results["generated"] = np.asarray(out.token_ids, np.int32)

    examples = [harmjax.data.Example(id=str(i), prompt=r["prompt"], response=r["response"])
                for i, r in enumerate(HARMFUL + BENIGN)]
    cfg = TrainConfig(lr=1e-3, warmup_steps=0, batch_size=4, micro_batch_size=2, max_steps=2,
                      val_fraction=0.2, max_length=64, text_format="raw")
    ft = finetune(model.with_params(pruned), examples, cfg, lora=LoraConfig(r=4, alpha=8.0), mask=mask,
                  output_dir=os.path.join(work, "finetune"), progress=False)
    keep("lora", ft.adapters)
    keep("finetuned", ft.params)
    export_peft(ft.adapters, LoraConfig(r=4, alpha=8.0), os.path.join(work, "peft"), mask=mask)
    keep("peft_file", load_safetensors_tree(os.path.join(work, "peft", "adapter_model.safetensors")))
    results["finetune_losses"] = np.asarray([r["loss"] for r in ft.metrics])
    results["finetune_val_loss"] = np.asarray(ft.val_loss)

    from configs.embedded import get_config
    from harmjax.experiments import run_experiment
    from tests.config_overrides import with_overrides

    overrides = EXPERIMENT + [("model", model_dir), ("prompts.harmful", os.path.join(prompts_dir, "harmful.csv")),
                              ("prompts.benign", os.path.join(prompts_dir, "benign.jsonl"))]
    metrics = run_experiment(with_overrides(get_config(), overrides, os.path.join(work, "experiment")),
                             progress=False)
    results["experiment_metrics"] = np.asarray(json.dumps(metrics["sweep"], sort_keys=True))
    # Claim 2's baselines stage (a q search, masks, NLLs and generations) as one process of two.
    results["experiment_baselines"] = np.asarray(json.dumps(metrics["benign_baselines"], sort_keys=True))

    if distributed.is_writer():
        np.savez(os.path.join(work, "results.npz"), **results)
    distributed.barrier("results written")


def scan_job(model_dir: str, work: str, address=None, num=None, pid=None) -> None:
    """The `--scan` job: the launchers' guards (`launch.common.run_app`) around one scan."""
    if address is not None:
        distributed.initialize(address, int(num), int(pid), timeout_s=120)
    import numpy as np

    import harmjax
    from harmjax import preemption
    from harmjax.errors import HarmjaxError

    preemption.watch_processes()  # $HARMJAX_LOST_PROCESS_TIMEOUT from the test
    try:
        with preemption.handle_sigterm(), preemption.clean_exit():
            model = harmjax.load(model_dir, dtype="float32",
                                 mesh=harmjax.MeshConfig(data=1, fsdp=-1, tensor=harmjax.HOST))
            # 48 examples in batches of 2: 24 batches, a save after each, several seconds.
            examples = [{"prompt": f"{r['prompt']} ({i})", "response": f"{r['response']} Step {i}."}
                        for i in range(12) for r in HARMFUL[:4]]
            result = harmjax.scan(model, examples, "harm", batch_size=2, progress=False,
                                  checkpoint_dir=os.path.join(work, "scan"), checkpoint_every=1)
            scores = {f"harm/{n}": distributed.to_host(x) for n, x in harmjax.tree.iter_leaves(result.scores)}
            if distributed.is_writer():
                tmp = os.path.join(work, "scan.tmp.npz")
                np.savez(tmp, resumed_from=np.int64(result.resumed_from), **scores)
                os.replace(tmp, os.path.join(work, "scan.npz"))
            distributed.barrier("scan results written")
    except HarmjaxError as e:
        sys.exit(f"error: {type(e).__name__}: {e}")


if __name__ == "__main__":
    try:
        if sys.argv[1] == "--scan":
            scan_job(*sys.argv[2:])
        else:
            main(*sys.argv[1:])
    except SystemExit as e:  # the job's own status (143: preempted), without the shutdown wait
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(e.code if isinstance(e.code, int) else 1)
    except BaseException:
        # Exit at once: the other process then fails in its next collective instead of
        # waiting out the runtime's shutdown barrier.
        import traceback

        traceback.print_exc()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(1)
