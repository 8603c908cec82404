"""Throughput at the paper's model sizes on the local GPUs, printed as JSON rows, in parts:

  scan:     harmjax's scan step (`harmjax.attribution.step.jit_accumulate`, what `harmjax.score`
            and the experiment run); --layerwise=0,1 runs each kind as one program and as
            per-block programs (`harmjax.attribution.layerwise`); --abs_kernel=0,1 runs the retain kind once per setting of
            HARMJAX_ABS_KERNEL (XLA's per-example blocks, then the fused kernel) and reports,
            for the first and the last layer's first accumulator, the largest difference
            against the first setting relative to its largest entry. --abs_kernel=0,0,1 adds
            a control: the XLA path compiled twice (what two compilations alone change).
            Each row has the scan's loss sum, so a forward pass that two programs round
            differently shows; --verify_kernel compares the kernel with XLA's per-example
            blocks on each call's own operands inside the step. --acc_layout=sharded,per_device
            adds an experiment harmjax does not ship: every device keeps a whole float32
            accumulator of its own examples, so a step has no cross-device reduction (what
            the per-step reduction costs; docs/measurements.md "Scans at 14B and 32B").
  select:   `harmjax.select` on random float32 score trees of --select_shape (q=1e-5,
            p=5e-5), first call (after jax.clear_caches: compilation included) and warm, per
            granularity in --select_kinds, and `candidates`: `top_candidates` at 5e-5, what
            the scores stage writes per unit. --select_one_program adds global selection
            through the CPU's one-program plan. Rows name the select module they timed, so a
            copy of an older harmjax on PYTHONPATH times the code before a change.
  generate: `harmjax.generate.generate_ids` greedy decoding on --gen_mesh, per batch size:
            decode step time against its floor (weight bytes per device / copy bandwidth),
            and against the floor with the KV cache's valid bytes added (bf16 cache).

--profile_dir traces a few warm steps (scan) or decode tokens (generate) with jax.profiler and
adds where the first GPU's time goes (matmuls, collectives and how much of them is exposed,
other fusions, idle) to the row.

Random bf16 weights are made on the devices (never on the host), examples are synthetic.

For each repeat it runs every kind in --kinds one after the other in this one process (a
retain scan after a harm scan once died in an XLA collective rendezvous at 32B on 2 GPUs), and
prints one JSON row per scan: compile time, warm wall time, tokens/s, MFU (6 x params x tokens
/ time over the measured bf16 matmul rate x devices), peak memory per device, and the
device-memory preflight's estimate (`harmjax.memory`). The memory fraction is harmjax's
launcher default (0.9) unless XLA_PYTHON_CLIENT_MEM_FRACTION is set.

  PYTHONPATH=. python benchmarks/scale_bench.py --shape=qwen25_32b --mesh=1,-1,1 --remat
  XLA_PYTHON_CLIENT_MEM_FRACTION=0.53 PYTHONPATH=. python benchmarks/scale_bench.py --shape=llama31_8b --remat
  PYTHONPATH=. python benchmarks/scale_bench.py --shape=tiny     # CPU smoke test
"""

from __future__ import annotations

import json
import os
import time
import zlib

from absl import app, flags

_SHAPE = flags.DEFINE_enum("shape", "qwen25_32b", ["tiny", "llama31_8b", "qwen25_14b", "qwen25_32b"], "Model shape.")
_MESH = flags.DEFINE_list("mesh", ["1", "-1", "1"], "Mesh data,fsdp,tensor (-1 = the rest; tensor 0 = harmjax.HOST).")
_KINDS = flags.DEFINE_list("kinds", ["harm", "retain"], "Scan kinds, run in this order in one process.")
_REPEATS = flags.DEFINE_integer("repeats", 2, "Times to run the kinds in sequence.")
_N = flags.DEFINE_integer("n", 412, "Examples per scan.")
_BATCH = flags.DEFINE_integer("batch", 16, "Examples per micro-batch.")
_SEQ = flags.DEFINE_integer("seq", 256, "Tokens per example.")
_REMAT = flags.DEFINE_bool("remat", False, "Rematerialise blocks.")
_ABS_CHUNK = flags.DEFINE_integer("abs_chunk", 8, "Per-example block of the retain scan.")
_OUT = flags.DEFINE_string("out", "", "Also write the rows here (JSON lines).")
_PARTS = flags.DEFINE_list("parts", ["scan"], "Parts to run, in this order: scan, select, generate.")
_ABS_KERNEL = flags.DEFINE_list("abs_kernel", ["auto"], "HARMJAX_ABS_KERNEL settings for the retain kind (auto, 0, 1).")
_LAYOUT = flags.DEFINE_list("acc_layout", ["sharded"], "Accumulator layouts, each kind once per layout: sharded "
                            "(harmjax's, like the weights) or per_device (an experiment: every device keeps a "
                            "whole float32 partial sum of its own examples, (devices, out, in), reduced once at the "
                            "end, so a step needs no cross-device reduction).")
_LAYERWISE = flags.DEFINE_list("layerwise", ["0"], "Per setting, each kind once with the whole-program step (0) "
                                "or the per-block programs of `harmjax.attribution.layerwise` (1).")
_SELECT_SHAPE = flags.DEFINE_string("select_shape", "", "Shape of the score trees (default --shape).")
_SELECT_KINDS = flags.DEFINE_list("select_kinds", ["matrix", "row", "global", "candidates"],
                                  "Select part: granularities timed, and `candidates` (top_candidates at 5e-5, what "
                                  "the scores stage writes per unit).")
_SELECT_ONE_PROGRAM = flags.DEFINE_bool("select_one_program", False, "Also time global selection through the "
                                        "one-program (CPU) plan.")
_GEN_MESH = flags.DEFINE_list("gen_mesh", ["1", "1", "-1"], "Mesh of the generate part.")
_GEN_BATCHES = flags.DEFINE_list("gen_batches", ["1", "64"], "Batch sizes of the generate part.")
_GEN_NEW = flags.DEFINE_integer("gen_new", 256, "New tokens per sequence.")
_GEN_PROMPT = flags.DEFINE_integer("gen_prompt", 128, "Prompt tokens.")
_GEN_UNROLL = flags.DEFINE_list("gen_unroll", ["1"], "Per setting, decode once per batch size with this many "
                                 "steps per decode-loop iteration (HARMJAX_DECODE_UNROLL).")
_GEN_GATHER = flags.DEFINE_list("gen_gather_logits", ["0"], "Per setting, decode once per batch size with the "
                                "logits gathered whole on each device before sampling (1, an experiment) or "
                                "sampled from vocabulary-split logits as harmjax does (0).")
_PROFILE_DIR = flags.DEFINE_string("profile_dir", "", "Trace a few warm steps per scan kind and per decode batch "
                                   "here (jax.profiler) and add their breakdown (benchmarks/trace_summary.py) to the row.")
_PROFILE_STEPS = flags.DEFINE_integer("profile_steps", 2, "Scan steps traced (decoding traces a whole call).")
_VERIFY_KERNEL = flags.DEFINE_bool("verify_kernel", False, "In the retain scan with the fused kernel, also compute "
                                   "XLA's per-example blocks on the same operands (first 256 output rows) at every "
                                   "call and report the largest difference (slow; a diagnostic).")

QWEN25 = dict(model_type="qwen2", vocab_size=152064, num_heads=40, num_kv_heads=8, head_dim=128,
              rms_norm_eps=1e-6, max_position_embeddings=32768, qkv_bias=True)
SHAPES = {
    "tiny": dict(model_type="qwen2", vocab_size=512, hidden_size=64, intermediate_size=128, num_layers=2,
                 num_heads=4, num_kv_heads=2, head_dim=16, max_position_embeddings=1024, qkv_bias=True),
    "llama31_8b": None,  # bench_common.LLAMA31_8B_SHAPE
    "qwen25_14b": dict(QWEN25, hidden_size=5120, intermediate_size=13824, num_layers=48),
    "qwen25_32b": dict(QWEN25, hidden_size=5120, intermediate_size=27648, num_layers=64),
}


def _config(shape_name):
    from bench_common import LLAMA31_8B_SHAPE
    from harmjax.config import ModelConfig, RopeConfig

    shape = SHAPES[shape_name] or LLAMA31_8B_SHAPE
    rope = RopeConfig(theta=1e6)
    return ModelConfig(**shape, rope=rope, rope_local=rope)


def _params(config, mesh, tiny):
    import jax
    import jax.numpy as jnp

    from harmjax.model.init import init_params

    t = time.perf_counter()
    params = init_params(config, jax.random.key(0), mesh, jnp.float32 if tiny else jnp.bfloat16)
    jax.block_until_ready(params)
    return params, time.perf_counter() - t


def _peak_gib():
    import jax

    return round(max((d.memory_stats() or {}).get("peak_bytes_in_use", 0) for d in jax.local_devices()) / 2**30, 2)


def _emit(rows, row):
    print(json.dumps(row), flush=True)
    rows.append(row)


def _trace(name, fn, steps):
    """Run `fn` under jax.profiler.trace into --profile_dir/name; its per-step breakdown."""
    import jax

    from trace_summary import summarize

    path = os.path.join(_PROFILE_DIR.value, name)
    with jax.profiler.trace(path):
        fn()
    try:
        return summarize(path, steps)
    except Exception as e:  # a diagnostic must not lose the timing row
        return {"error": repr(e)}


def _verify_kernel_calls(records):
    """Make every fused-kernel call also compute XLA's per-example blocks on its own operands
    and record (out, in, max |kernel - xla|, max |xla|) through a debug callback."""
    import jax
    import jax.numpy as jnp

    from harmjax.attribution import abs_kernel
    from harmjax.attribution.probes import per_example_sums

    real = getattr(abs_kernel.abs_grad_sum, "__wrapped__", abs_kernel.abs_grad_sum)

    def checked(x, g, sharding):
        out = real(x, g, sharding)
        # The first 256 output rows only: all of them in one step ran a 14B step out of memory.
        rows = min(256, g.shape[-1])
        ref, _ = per_example_sums(x, g[..., :rows], _ABS_CHUNK.value)
        shape = (g.shape[-1], x.shape[-1])
        jax.debug.callback(lambda e, m: records.append((shape, float(e), float(m))),
                           jnp.abs(out[:rows] - ref).max(), jnp.abs(ref).max())
        return out

    checked.__wrapped__ = real
    abs_kernel.abs_grad_sum = checked


_PER_DEVICE_PATCHED = []


def _per_device_step(config, mesh, names, kind, remat, chunk):
    """The experimental per-device accumulator layout: a jitted step like `jit_accumulate`'s
    whose accumulators are (devices, out, in) float32, split over the batch axes, each
    device adding only its own examples' contributions (signed and abs kinds)."""
    import jax
    import jax.numpy as jnp
    from jax.sharding import NamedSharding, PartitionSpec as P

    from harmjax.attribution import abs_kernel, probes
    from harmjax.attribution.core import accumulator_mode, probe_params
    from harmjax.model.decoder import forward
    from harmjax.model.loss import mean_nll_per_example
    from harmjax.sharding import active_axes, batch_sharding, param_shardings, replicated, spec_entry

    batch_entry = spec_entry(active_axes("batch", mesh))
    d = mesh.shape["data"] * mesh.shape["fsdp"]
    acc_sh = NamedSharding(mesh, P(batch_entry, None, None))

    def local_sum(g, x, absolute):
        def one(gl, xl):  # this device's examples -> (1, out, in)
            if absolute and abs_kernel.applicable(x, g, NamedSharding(mesh, P())):
                return abs_kernel.local_abs_grad_sum(xl, gl, interpret=abs_kernel.mode() == "interpret")[None]
            if not absolute:
                return jnp.einsum("bto,bti->oi", gl, xl, preferred_element_type=jnp.float32)[None]
            return probes.per_example_sums(xl, gl, chunk)[0][None]

        return jax.shard_map(one, mesh=mesh, in_specs=(P(batch_entry), P(batch_entry)),
                             out_specs=P(batch_entry, None, None), check_vma=False)(g, x)

    if not _PER_DEVICE_PATCHED:  # a probe mode the library does not have: route it here
        original = probes._bwd

        def bwd(mode, chunk_, sharding, residuals, g):
            if not mode.endswith("_per_device"):
                return original(mode, chunk_, sharding, residuals, g)
            x, weight, acc = residuals
            dx = jnp.einsum("...o,oi->...i", g, weight)
            return dx, None, acc + local_sum(g, x, mode.startswith("abs"))

        probes.probed_linear.defvjp(probes._fwd, bwd)
        _PER_DEVICE_PATCHED.append(True)
    mode = accumulator_mode(kind) + "_per_device"

    def loss_fn(accs, params, input_ids, attention_mask, loss_mask):
        probed = probe_params(params, accs, mode, chunk)
        return mean_nll_per_example(forward(probed, config, input_ids, attention_mask, remat=remat),
                                    input_ids, loss_mask).sum()

    def step(params, accs, input_ids, attention_mask, loss_mask):
        loss, new_accs = jax.value_and_grad(loss_fn)(accs, params, input_ids, attention_mask, loss_mask)
        return new_accs, loss

    from harmjax.tree import unflatten
    accs_sh = unflatten({n: acc_sh for n in names})
    batch = batch_sharding(mesh)
    jitted = jax.jit(step, in_shardings=(param_shardings(config, mesh), accs_sh, batch, batch, batch),
                     out_shardings=(accs_sh, replicated(mesh)), donate_argnums=(1,))
    return jitted, d, acc_sh


def scan_part(rows, rate):
    """Warm scan throughput per kind (and per abs-kernel setting for retain)."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    import harmjax
    from bench_common import synthetic_examples
    from harmjax.attribution.core import accumulator_mode, compiler_options, names_for
    from harmjax.attribution.step import abstract_accumulators, init_accumulators, jit_accumulate, step_bytes
    from harmjax.data.calibration import make_batches
    from harmjax.sharding import batch_sharding, sharded_zeros
    from harmjax.tree import flatten, unflatten

    config = _config(_SHAPE.value)
    mesh = harmjax.make_mesh(harmjax.MeshConfig(*(int(x) for x in _MESH.value)), model_config=config)
    tiny = _SHAPE.value == "tiny"
    params, init_s = _params(config, mesh, tiny)
    n_params = sum(x.size for x in jax.tree.leaves(params))
    names = names_for(config, None)
    # Accumulators compared across kernel settings: the first layer's (farthest from the loss,
    # where bf16 rounding differences of two compilations have grown through every layer's
    # backward) and the last layer's (nearest the loss: the kernel's own difference).
    probe_names = (names[0], names[-1])
    batches = make_batches(synthetic_examples(_N.value, _SEQ.value, config.vocab_size, seed=1), _BATCH.value, 0,
                           [_SEQ.value])
    sharding = batch_sharding(mesh)
    tokens = sum(b.num_tokens for b in batches)

    def place(b):
        return [jax.make_array_from_callback(a.shape, sharding, lambda i, a=a: a[i])
                for a in (b.input_ids, b.attention_mask, b.loss_mask)]

    reference, reference_loss = {}, {}
    runs = [(repeat, layout, lw, kind, setting) for repeat in range(_REPEATS.value) for layout in _LAYOUT.value
            for lw in _LAYERWISE.value for kind in _KINDS.value
            for setting in (_ABS_KERNEL.value if kind == "retain" else ["-"])]
    for repeat, layout, lw, kind, setting in runs:
        layerwise = lw == "1"
        if setting != "-":
            os.environ["HARMJAX_ABS_KERNEL"] = setting  # jit_accumulate keys its cache on it
        mode = accumulator_mode(kind)
        records = []
        if _VERIFY_KERNEL.value and setting not in ("-", "0"):
            _verify_kernel_calls(records)
        if layout == "per_device":
            step, d, acc_sh = _per_device_step(config, mesh, names, kind, _REMAT.value, _ABS_CHUNK.value)
            shapes = {n: s.shape for n, s in flatten(abstract_accumulators(config, mesh, names, mode)).items()}

            def fresh_accs(abstract=False):
                make = (lambda sh: jax.ShapeDtypeStruct((d, *sh), jnp.float32, sharding=acc_sh)) if abstract else (
                    lambda sh: sharded_zeros((d, *sh), jnp.float32, acc_sh))
                return unflatten({n: make(sh) for n, sh in shapes.items()})
        else:
            step = jit_accumulate(config, mesh, names, kind, _REMAT.value, _ABS_CHUNK.value, layerwise=layerwise)

            def fresh_accs(abstract=False):
                return (abstract_accumulators if abstract else init_accumulators)(config, mesh, names, mode)
        t = time.perf_counter()
        specs = [jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding)
                 for a in (batches[0].input_ids, batches[0].attention_mask, batches[0].loss_mask)]
        lower_s = None  # tracing and lowering alone, for the one-program step (cached for the estimate)
        if not layerwise:
            step.lower(params, fresh_accs(abstract=True), *specs)
            lower_s = time.perf_counter() - t
        estimate = step_bytes(step, params, fresh_accs(abstract=True), *specs)  # as the memory preflight
        accs = fresh_accs()
        accs, loss = step(params, accs, *place(batches[0]))
        loss.block_until_ready()
        compile_s = time.perf_counter() - t
        del accs, loss
        accs = fresh_accs()
        jax.block_until_ready(accs)
        records.clear()
        losses = []
        t = time.perf_counter()
        for b in batches:
            accs, loss = step(params, accs, *place(b))
            losses.append(loss)
        jax.block_until_ready(accs)
        seconds = time.perf_counter() - t
        loss_sum = float(sum(np.asarray(x, np.float64) for x in losses))
        finite = bool(all(bool(jnp.isfinite(x).all()) for x in jax.tree.leaves(accs)))
        flat = flatten(accs)
        probe = {n: np.asarray(flat[n]).sum(0) if layout == "per_device" else np.asarray(flat[n]) for n in probe_names}
        del flat
        profile = None
        if _PROFILE_DIR.value:  # a few more steps, traced (the probes are read already)
            steps = min(_PROFILE_STEPS.value, len(batches))
            box = [accs]

            def traced(box=box, steps=steps, params=params):
                for b in batches[:steps]:
                    box[0], _ = step(params, box[0], *place(b))
                jax.block_until_ready(box[0])

            del accs
            profile = _trace(f"scan_{kind}_{setting}_{layout}_{lw}_{repeat}", traced, steps)
            accs = box.pop()
        key = (kind, repeat)
        diff = None
        loss_equal = reference_loss.get(key, loss_sum) == loss_sum
        reference_loss.setdefault(key, loss_sum)
        if key in reference:
            diff = {n: float(np.abs(probe[n] - reference[key][n]).max() / max(np.abs(reference[key][n]).max(), 1e-30))
                    for n in probe_names}
        else:
            reference[key] = probe
        del accs, loss
        _emit(rows, {
            "part": "scan", "shape": _SHAPE.value, "xla_flags": os.environ.get("XLA_FLAGS", ""),
            "mesh": dict(mesh.shape), "kind": kind, "repeat": repeat,
            "abs_kernel": setting, "acc_layout": layout, "layerwise": layerwise,
            "scan_compiler_options": dict(compiler_options(mesh)), "remat": _REMAT.value, "batch": _BATCH.value, "examples": _N.value,
            "tokens": tokens, "params": n_params, "init_s": round(init_s, 1), "compile_s": round(compile_s, 1),
            "seconds": round(seconds, 2), "tokens_per_s": round(tokens / seconds),
            "mfu": round(6 * n_params * tokens / seconds / 1e12 / (rate * mesh.devices.size), 3),
            "peak_gib_per_device": _peak_gib(), "preflight_estimate_gib": round(estimate / 2**30, 2),
            "accumulators_finite": finite, "max_rel_diff_vs_first_setting": diff,
            "lower_s": None if lower_s is None else round(lower_s, 1), "loss_sum": loss_sum, "loss_equal_to_first_setting": loss_equal,
            "kernel_calls_checked": _kernel_check_summary(records) if records else None,
            "profile": profile,
        })
        if _VERIFY_KERNEL.value and setting not in ("-", "0"):
            from harmjax.attribution import abs_kernel
            abs_kernel.abs_grad_sum = abs_kernel.abs_grad_sum.__wrapped__
    del params


def _kernel_check_summary(records):
    """Worst relative difference of the kernel against XLA's blocks per (out, in) shape."""
    worst = {}
    for shape, err, scale in records:
        rel = err / max(scale, 1e-30)
        key = f"{shape[0]}x{shape[1]}"
        worst[key] = max(worst.get(key, 0.0), rel)
    return {"calls": len(records), "max_rel_diff_by_shape": worst}


def select_part(rows):
    """`select` first-call and warm seconds per granularity on random score trees."""
    import importlib

    import jax
    import jax.numpy as jnp
    import numpy as np

    import harmjax
    from harmjax.attribution.core import names_for, scope_shardings
    from harmjax.model.param_specs import param_specs
    from harmjax.tree import flatten, unflatten

    select_module = importlib.import_module("harmjax.masks.select")
    shape = _SELECT_SHAPE.value or _SHAPE.value
    config = _config(shape)
    mesh = harmjax.make_mesh(harmjax.MeshConfig(*(int(x) for x in _MESH.value)), model_config=config)
    names = names_for(config, None)
    shardings, specs = flatten(scope_shardings(config, mesh, names)), param_specs(config)

    makers = {}

    def scores(seed):
        out = {}
        for i, n in enumerate(names):
            key = (specs[n].shape, shardings[n])
            if key not in makers:  # one compilation per leaf shape
                makers[key] = jax.jit(lambda k, s=specs[n].shape: jax.random.normal(k, s, jnp.float32),
                                      out_shardings=shardings[n])
            out[n] = makers[key](jax.random.key(seed * 10_000 + i))
        return unflatten(out)

    harm, retain = scores(1), scores(2)
    jax.block_until_ready((harm, retain))
    # The process's first collective sets up the communicators (0.7 s on 2 x H200). In a job,
    # selection follows the scans, which did that; here it would be billed to the first row.
    t = time.perf_counter()
    jax.block_until_ready(jax.jit(lambda x: x.sum())(flatten(harm)[names[-1]]))
    first_collective = time.perf_counter() - t
    real_bits = select_module._radix_bits
    from harmjax.masks.sparse import top_candidates

    def run(granularity, harm=harm, retain=retain):
        if granularity == "candidates":  # what the scores stage writes per unit (fraction = p)
            return top_candidates(harm, 5e-5)
        mask = harmjax.select(harm, retain, q=1e-5, p=5e-5, granularity=granularity, progress=False)
        return jax.block_until_ready(mask)

    def count(out):
        if isinstance(next(iter(out.values())), tuple):
            return sum(len(idx) for idx, _ in out.values())
        return sum(int(x.sum()) for x in jax.tree.leaves(out))

    def digest(out):  # the candidates themselves (indices and values, in HF order), to compare two versions
        if not isinstance(next(iter(out.values())), tuple):
            return None
        from harmjax.masks.algebra import hf_order_key
        crc = 0
        for name in sorted(out, key=hf_order_key):
            idx, values = out[name]
            crc = zlib.crc32(np.asarray(values, np.float32).tobytes(), zlib.crc32(np.asarray(idx).tobytes(), crc))
        return crc

    variants = [(g, None) for g in _SELECT_KINDS.value]
    if "global" in _SELECT_KINDS.value and _SELECT_ONE_PROGRAM.value:
        variants.append(("global", "one_program"))
    for granularity, path in variants:
        select_module._radix_bits = real_bits if path != "one_program" else (lambda leaf: 1)
        jax.clear_caches()
        for value in vars(select_module).values():  # every cached selector program, in any version
            if hasattr(value, "cache_clear"):
                value.cache_clear()
        times = []
        for _ in range(2):
            t = time.perf_counter()
            out = run(granularity)
            times.append(time.perf_counter() - t)
        pruned, crc = count(out), digest(out)
        del out
        _emit(rows, {"part": "select", "shape": shape, "mesh": dict(mesh.shape), "granularity": granularity,
                     "global_path": path, "select_module": select_module.__file__,
                     "first_collective_s": round(first_collective, 2), "first_call_s": round(times[0], 2),
                     "warm_s": round(times[1], 2), "pruned": pruned, "candidates_crc32": crc,
                     "scored_weights": sum(x.size for x in jax.tree.leaves(harm)),
                     "peak_gib_per_device": _peak_gib()})
    select_module._radix_bits = real_bits
    del harm, retain


def generate_part(rows):
    """Greedy decode step time per batch size against the weight-read floor."""
    import jax
    import numpy as np

    import harmjax
    from bench_common import copy_bandwidth
    from harmjax.generate import generate_ids

    config = _config(_SHAPE.value)
    mesh = harmjax.make_mesh(harmjax.MeshConfig(*(int(x) for x in _GEN_MESH.value)), model_config=config)
    params, _ = _params(config, mesh, _SHAPE.value == "tiny")
    bandwidth = copy_bandwidth(0.002 if _SHAPE.value == "tiny" else 2.0, repeats=5)["bytes_per_s"]
    leaves = jax.tree.leaves(params)
    embed = params["model"]["embed_tokens"]["weight"]
    weight_bytes = sum(a.size * a.dtype.itemsize for a in leaves) - embed.size * embed.dtype.itemsize
    per_device = weight_bytes / mesh.devices.size
    from jax.sharding import NamedSharding, PartitionSpec as P

    from harmjax.generate import sampler
    from harmjax.sharding import active_axes, spec_entry

    harmjax_sample = sampler.sample_tokens
    whole = NamedSharding(mesh, P(spec_entry(active_axes("batch", mesh)), None))

    def gathered_sample(logits, *args, **kwargs):  # one all-gather of the logits, then a local argmax
        return harmjax_sample(jax.lax.with_sharding_constraint(logits, whole), *args, **kwargs)

    for unroll, gather, b in [(u, g, int(v)) for u in _GEN_UNROLL.value for g in _GEN_GATHER.value
                              for v in _GEN_BATCHES.value]:
        os.environ[sampler.UNROLL_ENV] = unroll
        sampler.sample_tokens = gathered_sample if gather == "1" else harmjax_sample
        sampler.jit_prefill.cache_clear()
        sampler.jit_decode.cache_clear()  # sample_tokens is read when the loop is traced
        if b == int(_GEN_BATCHES.value[0]):
            rng = np.random.default_rng(0)  # the same prompts for every setting
        ids = rng.integers(3, config.vocab_size, (b, _GEN_PROMPT.value)).tolist()
        kw = dict(max_new_tokens=_GEN_NEW.value, pad_id=0, eos_ids=(), batch_size=b, progress=False)
        t = time.perf_counter()
        generate_ids(params, config, mesh, ids, **kw)
        first = time.perf_counter() - t
        out = generate_ids(params, config, mesh, ids, **kw)
        s = out.stats
        step = s["decode_s"] / s["decode_steps"]
        digest = zlib.crc32(np.concatenate([np.asarray(row, np.int32) for row in out.tokens]).tobytes())
        profile = None
        if _PROFILE_DIR.value:  # a third, traced call: per decode step (the prefill included)
            profile = _trace(f"generate_b{b}_g{gather}", lambda p=params: generate_ids(p, config, mesh, ids, **kw),
                             s["decode_steps"])
        # The cache bytes a step reads too: every layer's keys and values of the valid slots,
        # on average the prompt plus half the new tokens (a lower bound: attention may read more).
        cache_bytes = (config.num_layers * 2 * config.num_kv_heads * config.head_dim * 2 * b
                       * (_GEN_PROMPT.value + (_GEN_NEW.value + 1) / 2) / mesh.devices.size)
        with_cache = (per_device + cache_bytes) / bandwidth
        _emit(rows, {"part": "generate", "shape": _SHAPE.value, "xla_flags": os.environ.get("XLA_FLAGS", ""),
                     "mesh": dict(mesh.shape), "batch": b, "gather_logits": gather, "decode_unroll": int(unroll),
                     "new_tokens": _GEN_NEW.value, "decode_step_ms": round(step * 1e3, 2),
                     "floor_ms": round(per_device / bandwidth * 1e3, 2),
                     "step_over_floor": round(step / (per_device / bandwidth), 2),
                     "floor_with_cache_ms": round(with_cache * 1e3, 2),
                     "step_over_floor_with_cache": round(step / with_cache, 2),
                     "decode_tokens_per_s": round(b / step), "prefill_s": round(s["prefill_s"], 3),
                     "compile_and_first_s": round(first, 1), "copy_bandwidth_tb_s": round(bandwidth / 1e12, 2),
                     "peak_gib_per_device": _peak_gib(), "profile": profile, "tokens_crc32": digest})
    sampler.sample_tokens = harmjax_sample
    del params


def main(argv):
    del argv
    os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.9")  # launch.common's default
    import jax

    from bench_common import matmul_tflops

    rate = matmul_tflops(1024 if _SHAPE.value == "tiny" else 8192)
    rows = []
    for part in _PARTS.value:
        {"scan": lambda: scan_part(rows, rate), "select": lambda: select_part(rows),
         "generate": lambda: generate_part(rows)}[part]()
    for row in rows:
        row.update(device=jax.devices()[0].device_kind, devices=jax.device_count(), jax=jax.__version__,
                   mem_fraction=os.environ["XLA_PYTHON_CLIENT_MEM_FRACTION"], matmul_tflops=round(rate, 1))
    if _OUT.value:
        with open(_OUT.value, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)


if __name__ == "__main__":
    app.run(main)
