"""The one-program train step: device-count invariance, one compile, one XLA module, learning."""
import functools
import re

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from lmoe_jax import losses, parallel, train
from lmoe_jax.models import create_model

IMG = (8, 8, 1)
K = 3


def opt_config(lr=0.05, **kw):
    c = ml_collections.ConfigDict(dict(
        optimizer='sgd', learning_rate=lr, end_learning_rate=lr * 1e-3, warmup_steps=0,
        momentum=0.9, nesterov=True, weight_decay=1e-4, grad_clip_norm=0.0))
    c.update(kw)
    return c


def tiny_model(bn_axis_name=None, dtype='float32'):
    return create_model(ml_collections.ConfigDict(dict(name='small_cnn', width=4, dtype=dtype)), K,
                        bn_axis_name=bn_axis_name)


def tiny_state(model, steps=100, **kw):
    tx, lr_fn = train.make_optimizer(opt_config(**kw), steps)
    return train.create_train_state(jax.random.key(0, impl='rbg'), model, tx, lr_fn, IMG)


def make_batch(b, seed=0):
    """Learnable toy problem: the class is the bright image quadrant; outliers are noise."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, K, b).astype(np.int32)
    img = rng.normal(0, 0.3, (b, *IMG)).astype(np.float32)
    for i, y in enumerate(labels):
        r, c = divmod(int(y), 2)
        img[i, r * 4:(r + 1) * 4, c * 4:(c + 1) * 4] += 2.0
    ood = rng.normal(0, 1.0, (b, *IMG)).astype(np.float32)
    return {'image': img, 'label': labels, 'ood_image': ood}


def to_numpy(tree):
    return jax.tree.map(lambda x: np.asarray(jax.device_get(x)), tree)


# ------------------------------------------------------------------ 1 device == jit(8) == pmap(8)


@pytest.mark.parametrize('method_name,overrides', [
    ('lmoe', {}),
    ('mixoe_cutmix', {'lam_per_example': True}),
])
def test_single_device_jit_mesh_and_pmap_agree(method_name, overrides):
    """One step of each method on one device, jit over 8 devices and pmap over 8: gradients,
    params, BatchNorm statistics and loss terms within the derived float32 bound of
    tests/test_equivalence.py (``step_tolerance``; one step: later steps are chaotic)."""
    import step_worker
    from test_equivalence import assert_step_outputs_close, step_tolerance
    method = losses.get_method(method_name, overrides)
    batch, rng = step_worker.global_batch(), jax.random.key(42)
    state = step_worker.initial_state()
    one = step_worker.outputs(*jax.jit(functools.partial(train.train_step, method=method))(
        state, batch, rng))

    mesh = parallel.make_mesh()
    jit_state, jit_metrics = parallel.jit_train_step(method, mesh)(
        parallel.replicate(state, mesh), parallel.global_batch(batch, mesh),
        parallel.replicate(rng, mesh))
    assert jit_state.params['fc']['kernel'].sharding.is_fully_replicated

    runner = parallel.make_runner('pmap', method, rng)  # BatchNorm synchronised over devices
    pstate, pmap_metrics = runner.step(runner.place(parallel.replicate(
        step_worker.initial_state(runner.bn_axis_name), mesh)), batch)
    pmap_state = runner.global_state(pstate)
    assert pmap_state.params['fc']['kernel'].sharding.is_fully_replicated

    tol = step_tolerance(state)
    assert_step_outputs_close(step_worker.outputs(jit_state, jit_metrics), one, tol, 'jit')
    assert_step_outputs_close(step_worker.outputs(pmap_state, pmap_metrics), one, tol, 'pmap')


def test_batch_not_divisible_by_devices_is_refused():
    with pytest.raises(ValueError, match='batch_size=12 is not divisible by the 8 devices'):
        parallel.check_batch_size(12, 8)
    parallel.check_batch_size(16, 8)


# ------------------------------------------------------------------ one compile, one program


def test_step_compiles_once_runs_without_host_transfers_and_is_one_module():
    method = losses.get_method('lmoe')
    mesh = parallel.make_mesh()
    state = parallel.replicate(tiny_state(tiny_model()), mesh)
    step = parallel.jit_train_step(method, mesh)
    rng = parallel.replicate(jax.random.key(1), mesh)
    batches = [parallel.global_batch(make_batch(16, seed=s), mesh) for s in range(5)]
    with jax.transfer_guard('disallow'):
        for b in batches:
            state, metrics = step(state, b, rng)
    assert step._cache_size() == 1
    assert int(state.step) == 5

    lowered = step.lower(state, batches[0], rng)
    hlo = lowered.compile().as_text()
    assert len(re.findall(r'^HloModule ', hlo, flags=re.M)) == 1
    # the mixing, the lam draw and the loss terms live in that one program
    stablehlo = lowered.as_text()
    assert 'log_softmax' in stablehlo or 'reduce' in stablehlo
    # ONE forward pass: every forward convolution sees the 3*16 = 48 concatenated images; no
    # convolution runs on a 16-image batch.
    convs = re.findall(r'stablehlo.convolution\(.*?: \(tensor<(\d+)x', stablehlo)
    n_conv_layers = sum(1 for path in jax.tree_util.tree_leaves_with_path(state.params)
                        if 'conv' in jax.tree_util.keystr(path[0]).lower()
                        and 'kernel' in jax.tree_util.keystr(path[0]))
    assert convs.count('48') >= n_conv_layers, (convs, n_conv_layers)
    assert '16' not in convs
    for name in ('loss/id', 'loss/logit_mix', 'loss/consistency', 'loss/input_mix', 'loss/oe',
                 'loss/energy', 'loss/total', 'lam', 'grad_norm', 'learning_rate', 'accuracy'):
        assert name in metrics


@pytest.mark.parametrize('method_name,n_images', [
    ('baseline', 16), ('oe', 32), ('energy_oe', 32), ('mixoe_mixup', 32), ('mixoe_cutmix', 32),
    ('lmoe', 48)])
def test_methods_forward_only_the_images_they_need(method_name, n_images):
    method = losses.get_method(method_name)
    state = tiny_state(tiny_model())
    step = jax.jit(functools.partial(train.train_step, method=method))
    lowered = step.lower(state, make_batch(16), jax.random.key(0))
    text = lowered.as_text()
    # terms that need a pass that was not run are absent; logit_mix only where lam is drawn
    metric_names = set(jax.eval_shape(step, state, make_batch(16), jax.random.key(0))[1])
    assert ('loss/logit_mix' in metric_names) == (method.needs_lam and method.needs_ood)
    assert ('loss/oe' in metric_names) == method.needs_ood
    assert ('loss/input_mix' in metric_names) == method.needs_mix
    first_conv_batches = re.findall(r'stablehlo.convolution\(.*?: \(tensor<(\d+)x8x8x1xf32>',
                                    text)
    assert first_conv_batches and set(first_conv_batches) == {str(n_images)}


# ------------------------------------------------------------------ no hidden collectives

MOVES_DATA = ('all-to-all', 'collective-permute', 'all-gather', 'reduce-scatter')


def collectives(hlo_text):
    """``(op, result shape)`` of each collective instruction in optimised HLO text."""
    ops = '|'.join(MOVES_DATA + ('all-reduce',))
    return re.findall(r'^\s*(?:ROOT )?%\S+ = (.*?) (' + ops + r')(?:-start)?\(', hlo_text,
                      flags=re.M)


def test_interleave_orders_rows_by_example_and_deinterleave_undoes_it():
    x, x_ood, x_mix = (np.arange(4)[:, None] + 10 * p + np.zeros((4, 2)) for p in range(3))
    images = np.asarray(train.interleave([jnp.asarray(x), jnp.asarray(x_ood), jnp.asarray(x_mix)]))
    # example b's three images sit in rows 3b, 3b+1, 3b+2: ID, outlier, mixed
    np.testing.assert_array_equal(images[:, 0], [0, 10, 20, 1, 11, 21, 2, 12, 22, 3, 13, 23])
    back = train.deinterleave(jnp.asarray(images), 3)
    for got, want in zip(back, (x, x_ood, x_mix)):
        np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(train.interleave([jnp.asarray(x)]), x)
    np.testing.assert_array_equal(train.deinterleave(jnp.asarray(x), 1)[0], x)


def test_collective_counter_sees_a_reshard():
    """The counter below is not vacuous: concatenating two batch-sharded arrays along the
    sharded axis makes XLA move shards between devices, and the counter sees it."""
    mesh = parallel.make_mesh()
    x = jax.ShapeDtypeStruct((16, 4), jnp.float32, sharding=parallel.data_sharded(mesh))
    f = jax.jit(lambda a, b: jnp.concatenate([a, b]) * 2.0,
                out_shardings=parallel.data_sharded(mesh))
    found = [op for _, op in collectives(f.lower(x, x).compile().as_text())]
    assert set(found) & set(MOVES_DATA), found


@pytest.mark.parametrize('method_name,overrides', [(name, {}) for name in losses.PRESETS] + [
    ('mixoe_mixup', {'lam_per_example': True}),
    ('mixoe_cutmix', {'lam_per_example': True}),
    ('lmoe', {'lam_per_example': True}),
    ('lmoe', {'mix': 'cutmix', 'lam_per_example': True}),
])
def test_jit_step_on_a_mesh_keeps_every_shard_on_its_device(method_name, overrides):
    """Data parallelism needs all-reduces only (gradients, BatchNorm statistics, metrics): no op
    that moves batch shards between devices, and no all-reduce of a boolean (the stop flag of a
    sampling loop that XLA split over the devices)."""
    method = losses.get_method(method_name, overrides)
    mesh = parallel.make_mesh()
    state = jax.eval_shape(lambda: tiny_state(tiny_model()))
    batch = parallel.global_batch(make_batch(16), mesh)
    step = parallel.jit_train_step(method, mesh)
    found = collectives(step.lower(state, batch, jax.random.key(0)).compile().as_text())
    assert [op for _, op in found if op in MOVES_DATA] == []
    reduced = [shape for shape, op in found if op == 'all-reduce']
    assert reduced, 'the gradients must be all-reduced'
    assert not [shape for shape in reduced if 'pred[' in shape], reduced


# ------------------------------------------------------------------ learning, determinism, bf16


@pytest.mark.parametrize('method_name', list(losses.PRESETS))
def test_loss_falls_for_every_preset(method_name):
    method = losses.get_method(method_name)
    state = tiny_state(tiny_model(), steps=60, lr=0.05)
    step = jax.jit(functools.partial(train.train_step, method=method), donate_argnums=0)
    history = []
    for s in range(60):
        state, m = step(state, make_batch(32, seed=s % 8), jax.random.key(7))
        history.append((float(m['loss/total']), float(m['loss/id'])))
    h = np.array(history)
    assert np.all(np.isfinite(h))
    # the total carries lam-dependent soft-target entropy (noisy, with a floor): averaged windows.
    # With logit_mix_stop_id the step does not descend the total (the ID logits follow CE alone,
    # and a growing margin raises the logit_mix value: docs/comparison.md, "The margin cap"), so
    # only the ID cross-entropy below must fall.
    if not method.weights.logit_mix_stop_id:
        assert h[-15:, 0].mean() < 0.85 * h[:15, 0].mean(), h[:, 0]
    assert h[-8:, 1].mean() < 0.5 * h[:8, 1].mean(), h[:, 1]


def test_same_rng_gives_bit_identical_results():
    method = losses.get_method('lmoe', {'lam_per_example': True})
    step = jax.jit(functools.partial(train.train_step, method=method))

    def run(seed):
        state = tiny_state(tiny_model())
        for s in range(3):
            state, m = step(state, make_batch(16, seed=s), jax.random.key(seed))
        return to_numpy(state.params), to_numpy(m)

    (p1, m1), (p2, m2), (p3, m3) = run(5), run(5), run(6)
    jax.tree.map(np.testing.assert_array_equal, p1, p2)
    jax.tree.map(np.testing.assert_array_equal, m1, m2)
    assert float(m1['lam']) != float(m3['lam'])


def test_bfloat16_compute_is_finite_with_float32_logits_and_params():
    model = tiny_model(dtype='bfloat16')
    state = tiny_state(model)
    logits = model.apply(state.variables, make_batch(4)['image'], train=False)
    assert logits.dtype == jnp.float32
    step = jax.jit(functools.partial(train.train_step, method=losses.get_method('lmoe')))
    for s in range(3):
        state, m = step(state, make_batch(16, seed=s), jax.random.key(0))
    assert all(np.isfinite(float(v)) for v in m.values())
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(state.params))


def test_learning_rate_follows_cosine_schedule():
    tx, lr_fn = train.make_optimizer(opt_config(lr=0.1, end_learning_rate=0.001), 10)
    expect = [0.001 + (0.1 - 0.001) * 0.5 * (1 + np.cos(np.pi * t / 10)) for t in range(11)]
    np.testing.assert_allclose([float(lr_fn(t)) for t in range(11)], expect, rtol=1e-5)
    _, warm = train.make_optimizer(opt_config(lr=0.1, warmup_steps=4), 10)
    np.testing.assert_allclose([float(warm(t)) for t in range(5)], [0, 0.025, 0.05, 0.075, 0.1],
                               rtol=1e-5, atol=1e-7)
    with pytest.raises(ValueError, match='unknown optimizer'):
        train.make_optimizer(opt_config(optimizer='lamb'), 10)


def test_sgd_update_matches_hand_computed_nesterov_with_l2():
    """One parameter, two steps of torch-style SGD (coupled weight decay, Nesterov)."""
    tx, _ = train.make_optimizer(opt_config(lr=0.1, end_learning_rate=0.1, weight_decay=0.01), 10)
    p = {'w': jnp.array([2.0])}
    s = tx.init(p)
    g = {'w': jnp.array([0.5])}
    # torch: d = g + wd*p; buf = mu*buf + d; step = d + mu*buf; p -= lr*step
    pw, buf = 2.0, 0.0
    for _ in range(2):
        d = 0.5 + 0.01 * pw
        buf = 0.9 * buf + d
        pw = pw - 0.1 * (d + 0.9 * buf)
        u, s = tx.update(g, s, p)
        p = {'w': p['w'] + u['w']}
    np.testing.assert_allclose(p['w'], [pw], rtol=1e-6)
