"""The production train step of lmoe_jax timed in this process: the JAX worker of train_step.py
and gpu.py.

``lmoe_jax.parallel.jit_train_step`` (jit over a mesh, state donated) on a synthetic batch already
on the device, the model from ``lmoe_jax.models.create_model`` and the optimiser from
``lmoe_jax.train.make_optimizer``. Imports jax, flax, optax, numpy and lmoe_jax only (no
TensorFlow, TFDS, CLU or ml_collections).
"""
from __future__ import annotations

import time

import numpy as np

import common


def _flops(analysis) -> float | None:
    """'flops' of a cost analysis (a dict, or a one-element list of dicts in older jax)."""
    if isinstance(analysis, (list, tuple)):
        analysis = analysis[0] if analysis else None
    flops = (analysis or {}).get('flops')
    return float(flops) if flops is not None and flops > 0 else None


def run(spec: dict) -> dict:
    """Compile and time one (model, batch, method) case; see train_step.py for the fields.

    ``spec``: model, image_size, channels, num_classes, batch_size, dtype, method, steps, warmup;
    optional width, num_devices (default: all), matmul_convs (default 'auto'), patch (a
    ``xla_variants`` name applied before the model is built).
    """
    import jax

    from lmoe_jax import losses, parallel, train
    from lmoe_jax.models import create_model

    if spec.get('patch'):
        import xla_variants
        xla_variants.apply(spec['patch'])
    method = losses.get_method(spec['method'])
    n, b, c, k = spec['image_size'], spec['batch_size'], spec['channels'], spec['num_classes']
    model = create_model(dict(name=spec['model'], dtype=spec['dtype'], width=spec.get('width'),
                              matmul_convs=spec.get('matmul_convs', 'auto')), k)
    tx, lr_fn = train.make_optimizer(common.OPTIMIZER, 10_000)
    devices = jax.devices()[:spec['num_devices']] if spec.get('num_devices') else jax.devices()
    mesh = parallel.make_mesh(devices)
    parallel.check_batch_size(b, len(devices))
    # An 'rbg' key: the initial values do not change the step's speed, and threefry's init
    # program compiles far longer (seconds on CPU).
    state = parallel.init_state(jax.random.key(0, impl='rbg'), model, tx, lr_fn, (n, n, c), mesh)
    rng = np.random.default_rng(0)
    host_batch = {
        'image': rng.normal(size=(b, n, n, c)).astype(np.float32),
        'label': rng.integers(0, k, b).astype(np.int32),
        'ood_image': rng.normal(size=(b, n, n, c)).astype(np.float32),
    }
    batch = parallel.global_batch(host_batch, mesh)
    key = parallel.replicate(jax.random.key(1), mesh)
    step = parallel.jit_train_step(method, mesh)

    t0 = time.perf_counter()
    lowered = step.lower(state, batch, key)
    compiled = lowered.compile()
    compile_s = time.perf_counter() - t0
    out = {'compile_s': compile_s, 'matmul_convs': bool(model.matmul_convs)}
    for name, obj in (('xla_flops_lowered', lowered), ('xla_flops_compiled', compiled)):
        try:
            out[name] = _flops(obj.cost_analysis())
        except Exception:  # noqa: BLE001 - not every backend reports it
            out[name] = None
    try:
        mem = compiled.memory_analysis()
        out['xla_mib'] = (mem.argument_size_in_bytes + mem.output_size_in_bytes
                          + mem.temp_size_in_bytes - mem.alias_size_in_bytes) / 2**20
    except Exception:  # noqa: BLE001 - not every backend reports it
        out['xla_mib'] = None

    common.reset_rss_peak()  # the mark now covers warm-up and timed steps, not compilation
    rss_before = common.rss_mib()
    first_steps = []
    for _ in range(max(1, spec['warmup'])):  # >= 1: the first run allocates
        t0 = time.perf_counter()
        state, metrics = compiled(state, batch, key)
        jax.block_until_ready((state, metrics))
        first_steps.append(time.perf_counter() - t0)
    if not np.isfinite(float(metrics['loss/total'])):
        raise RuntimeError(f'non-finite loss in {spec}')

    def one_step():
        nonlocal state, metrics
        state, metrics = compiled(state, batch, key)
        return state, metrics

    times, cpu_times = common.time_steps(one_step, spec['steps'], jax.block_until_ready)
    peak = common.rss_peak_mib()
    out.update(common.summarize(times, b, common.forward_passes(spec['method']), cpu_times))
    out.update(first_step_s=first_steps[0], device=str(devices[0].device_kind),
               num_devices=len(devices), backend=jax.default_backend(), jax=jax.__version__)
    stats = devices[0].memory_stats() if devices[0].platform != 'cpu' else None
    if stats and 'peak_bytes_in_use' in stats:
        out['peak_mib'] = stats['peak_bytes_in_use'] / 2**20
        out['peak_kind'] = 'device peak_bytes_in_use (whole process)'
        if stats.get('bytes_limit'):
            out['memory_limit_mib'] = stats['bytes_limit'] / 2**20
    elif peak is not None and rss_before is not None:
        out['peak_mib'] = peak - rss_before
        out['peak_kind'] = 'host RSS high-water delta over the steps'
    return out
