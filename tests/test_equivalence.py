"""The same computation on other device layouts and process counts gives the same numbers.

Only what is deterministic up to float32 rounding is compared, with a bound derived from the
computation (each test says how); whatever is computed from those numbers on the host is then
compared on the SAME inputs, where it must agree exactly. These tests must hold on any x86-64
CPU: scripts/stress_equivalence.sh runs them under other ISAs, device counts and thread counts.

The rounding model used throughout (Higham, "Accuracy and Stability of Numerical Algorithms",
sections 3.1 and 4.2): a float32 sum or dot product of ``n`` terms, in ANY order, with or without
FMA, is within ``gamma(n) * sum|terms|`` of the exact value, ``gamma(n) = n*u / (1 - n*u)``,
``u = 2**-24``. Two computations that differ only in order (another device split, another
kernel, another ISA) therefore differ by at most twice that.
"""
import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest

import evaluate_worker
from run_helpers import xla_flags

U32 = 2.0 ** -24  # unit roundoff of float32
HERE = os.path.dirname(os.path.abspath(__file__))


def gamma(n: int) -> float:
    """Higham's gamma_n: relative bound of an n-term float32 sum in any order."""
    return n * U32 / (1 - n * U32)


def free_port() -> str:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return str(s.getsockname()[1])


def worker_env(devices: int) -> dict:
    """A child with ``devices`` CPU devices, gloo collectives, and this process's other XLA
    flags (an ISA limit, say: scripts/stress_equivalence.sh)."""
    return {**os.environ, 'XLA_FLAGS': xla_flags(devices), 'JAX_PLATFORMS': 'cpu',
            'JAX_CPU_COLLECTIVES_IMPLEMENTATION': 'gloo', 'PYTHONPATH': os.path.dirname(HERE)}


def run_processes(script: str, args_of, num: int, timeout: float = 600):
    """Start ``num`` processes of ``script`` on one loopback coordinator, this process's devices
    split between them; fail with their stderr."""
    import jax
    assert jax.device_count() % num == 0
    port = free_port()
    procs = [subprocess.Popen([sys.executable, os.path.join(HERE, script), *args_of(i, port)],
                              env=worker_env(jax.device_count() // num), stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE) for i in range(num)]
    for proc in procs:
        _, err = proc.communicate(timeout=timeout)
        assert proc.returncode == 0, err.decode()[-3000:]


# --------------------------------------------------------------------------------------------------
# Evaluation: per-image scores across layouts; metrics on the same scores
# --------------------------------------------------------------------------------------------------

def tiny_forward_error_bounds(variables, images):
    """Bounds on |computed - exact| of the worker's tiny model: (logits [N, K], features [N, D]).

    The model is conv3x3 (1 -> 4 channels, SAME) -> relu -> mean over 8x8 -> dense(6) -> relu
    (features) -> dense(K) (logits). With ``A`` the same network run on |x| with |W|, |b| (in
    float64; relu is then the identity), every activation satisfies |a_l| <= A_l, and the
    error recursion e_l <= |W_l| e_{l-1} + gamma(n_l) (|W_l| A_{l-1} + |b_l|) gives
    e_L <= (sum_l gamma(n_l)) * A_L, n_l = terms of layer l's reductions (+1 for the bias; the
    mean: 64 terms and one division). Relu is 1-Lipschitz and rounds nothing.
    """
    p = variables['params']
    w1, b1 = np.abs(np.float64(p['Conv_0']['kernel'])), np.abs(np.float64(p['Conv_0']['bias']))
    w2, b2 = np.abs(np.float64(p['Dense_0']['kernel'])), np.abs(np.float64(p['Dense_0']['bias']))
    w3, b3 = np.abs(np.float64(p['fc']['kernel'])), np.abs(np.float64(p['fc']['bias']))
    x = np.pad(np.abs(np.float64(images)), ((0, 0), (1, 1), (1, 1), (0, 0)))
    windows = np.lib.stride_tricks.sliding_window_view(x, (3, 3), axis=(1, 2))  # N,H,W,C,3,3
    a1 = np.einsum('nhwcij,ijco->nhwo', windows, w1) + b1
    a2 = a1.mean(axis=(1, 2))
    feats = a2 @ w2 + b2
    logits = feats @ w3 + b3
    g_conv, g_mean = gamma(w1.shape[0] * w1.shape[1] * w1.shape[2] + 1), gamma(a1.shape[1] * a1.shape[2] + 1)
    g_feat = g_conv + g_mean + gamma(w2.shape[0] + 1)
    return (g_feat + gamma(w3.shape[0] + 1)) * logits, g_feat * feats


def logit_score_tolerance(logit_bound, scale: float = 1.0):
    """|score_a - score_b| for MSP (log-odds) and energy from two logit vectors within the bound.

    Both are max / log-sum-exp of the logits, Lipschitz with constant 2 (MSP: z_max minus a
    log-sum-exp of the rest) and 1 (energy) in the max-norm; two computations differ by <= 2x the
    bound each. ``scale``: logits divided by T (ODIN). Plus the score's own float32 rounding on
    either side (a log-sum-exp of K terms: (K + 4) u of its magnitude, generously).
    """
    k = logit_bound.shape[1]
    return 2 * 2 * scale * logit_bound.max(axis=1), (k + 4) * U32


@pytest.fixture(scope='module')
def eval_runs(tmp_path_factory):
    """Per-image scores and metrics of one process on one device, on 8 devices, and 2 x 4."""
    root = tmp_path_factory.mktemp('eval')
    one = evaluate_worker.run(0, 1, workdir=str(root / 'one'))
    mesh = evaluate_worker.run(0, 1, workdir=str(root / 'mesh'), mesh=True)
    (root / 'two').mkdir()  # both processes write into it; neither may have to create it
    run_processes('evaluate_worker.py', lambda i, port: [str(i), '2', port, str(root / 'two')],
                  num=2)
    metrics = [json.loads((root / 'two' / f'metrics_{i}.json').read_text()) for i in range(2)]
    scores = {name: dict(np.load(root / name / 'report' / 'ood_scores.npz' if name == 'two'
                                 else root / name / 'ood_scores.npz'))
              for name in ('one', 'mesh', 'two')}
    return {'root': root, 'scores': scores, 'metrics': {'one': one, 'mesh': mesh, 'two': metrics}}


@pytest.mark.slow
@pytest.mark.parametrize('layout', ['mesh', 'two'])
def test_eval_scores_per_image_match_one_device_within_the_rounding_bound(eval_runs, layout):
    """MSP, energy and ODIN of every image: 8 devices, or 2 processes x 4, vs one device.

    Tolerance: ``logit_score_tolerance`` of ``tiny_forward_error_bounds`` (ODIN: at its
    perturbed input, |x| + eps/std, and logits / T). ODIN's step is eps*sign(gradient): a sign
    that rounding can flip belongs to a gradient component within its rounding error of 0, so
    the flip changes the score by eps/std times that near-zero component (second order: none of
    this budget). Not compared here: the fitted scores (KL matching, Mahalanobis, ViM, ReAct),
    whose statistics are fitted on outputs carrying the same rounding and whose bound would need
    the sensitivity of each fit; the metrics test below checks them on each layout's own scores.
    """
    data = evaluate_worker.data()
    variables = evaluate_worker.variables()
    want, got = eval_runs['scores']['one'], eval_runs['scores'][layout]
    assert sorted(got) == sorted(want)
    std = float(np.mean([0.229, 0.224, 0.225]))  # the worker's odin_input_std='imagenet', grey
    for name in ('id_test', 'fine'):
        order = evaluate_worker.gathered_order(len(data[name][0]), 2 if layout == 'two' else 1)
        images = data[name][0][order]
        bound, _ = tiny_forward_error_bounds(variables, images)
        odin_bound, _ = tiny_forward_error_bounds(variables, np.abs(images) + 0.0014 / std)
        for score, (bound_abs, rel) in {
                'msp': logit_score_tolerance(bound), 'energy': logit_score_tolerance(bound),
                'odin': logit_score_tolerance(odin_bound, scale=1 / 1000)}.items():
            a, b = want[f'{name}/{score}'][order], got[f'{name}/{score}']
            assert a.shape == b.shape == (len(images),)
            tol = bound_abs + rel * np.maximum(np.abs(a), 1.0)
            bad = np.abs(a - b) > tol
            assert not bad.any(), (name, score, a[bad], b[bad], tol[bad])
            assert np.all(tol < 1e-3 * np.maximum(np.abs(a), 1.0))  # the bound says something


def _metrics_of(scores, id_name='id_test', ood_name='fine'):
    from lmoe_jax.ood import metrics as metrics_lib
    names = sorted({k.split('/')[1] for k in scores})
    return {s: metrics_lib.all_metrics(scores[f'{id_name}/{s}'], scores[f'{ood_name}/{s}'])
            for s in names}


@pytest.mark.slow
@pytest.mark.parametrize('layout', ['one', 'mesh', 'two'])
def test_eval_metrics_are_those_of_the_saved_scores_exactly(eval_runs, layout):
    """Every layout's metrics are the float64 metrics of the per-image scores it saved: the
    host part (gathering, metrics) adds nothing, whatever the layout and process count. MSP's
    AUROC is also checked against sklearn on those scores (to float64 rounding)."""
    from sklearn.metrics import roc_auc_score
    scores = eval_runs['scores'][layout]
    metrics = eval_runs['metrics'][layout]
    if layout == 'two':
        assert metrics[0] == metrics[1]  # every process returns the same metrics
        metrics = metrics[0]
    want = _metrics_of(scores)
    assert sorted(metrics['scores']) == sorted(want)
    for score, row in want.items():
        assert metrics['scores'][score]['fine'] == row, score
    msp_id, msp_fine = scores['id_test/msp'], scores['fine/msp']
    auroc = roc_auc_score(np.r_[np.zeros(len(msp_id)), np.ones(len(msp_fine))], -np.r_[msp_id, msp_fine])
    assert metrics['scores']['msp']['fine']['openood_auroc'] == pytest.approx(auroc, rel=1e-12)


@pytest.mark.slow
def test_two_process_eval_sees_every_image_and_writes_one_report(eval_runs):
    """Not numerics: each process feeds its part, yet all 45 + 27 images are scored once, and
    only process 0 writes the report."""
    root = eval_runs['root']
    got, want = eval_runs['metrics']['two'][0], eval_runs['metrics']['one']
    assert got['num_images'] == want['num_images'] == {'id_test': 45, 'fine': 27}
    assert (root / 'two' / 'report' / 'ood_report.json').exists()
    assert sorted(p.name for p in (root / 'two').iterdir()) == ['metrics_0.json', 'metrics_1.json', 'report']


# --------------------------------------------------------------------------------------------------
# One train step: one device, jit over 8 devices, pmap over 8, 2 processes x 4 devices
# --------------------------------------------------------------------------------------------------

def step_tolerance(state) -> float:
    """Normwise relative bound on two layouts' results of one step of tests/step_worker.py.

    Every number of the step is a chain of float32 reductions: per layer, forward (convolution,
    BatchNorm mean and variance, pooling, dense) and backward (the same reductions transposed,
    plus the weight gradients summed over the batch and the pixels). None sums more terms than
    n = 3 images per example x 16 examples x 8 x 8 pixels = 3072 (the fan-ins are <= 9 x 16 =
    144). With L layers, each result is within 2 L gamma(n) of the exact value relative to the
    size of what it sums, so two layouts are within twice that. Measured normwise (max-norm of
    the whole tree, e.g. all gradients), so a near-zero element that is cancellation noise is
    held to the scale of its neighbours, not to its own.
    """
    import jax
    layers = sum(1 for path, _ in jax.tree_util.tree_leaves_with_path(state.params)
                 if jax.tree_util.keystr(path).endswith("['kernel']")) + \
        len(jax.tree_util.tree_leaves(state.batch_stats)) // 2
    return 2 * 2 * layers * gamma(3 * 16 * 8 * 8)


def assert_step_outputs_close(got: dict, want: dict, tol: float, what: str):
    """Each kind (grads, params, batch_stats, metrics) within ``tol`` of its max-norm."""
    assert sorted(got) == sorted(want), what
    for kind in ('grads', 'params', 'batch_stats', 'metrics'):
        names = [k for k in want if k.startswith(kind + '/')]
        assert names, kind
        scale = max(np.abs(want[k]).max() for k in names)
        for k in names:
            if kind == 'metrics':  # each a scalar of its own size (losses, norms, rates)
                scale = max(abs(float(want[k])), 1e-30)
            err = np.abs(got[k] - want[k]).max()
            if os.environ.get('LMOE_PRINT_ERRORS'):
                print(f'{what} {k}: err/(tol*scale) = {err / (tol * scale):.3g}')
            assert err <= tol * scale, f'{what}: {k} differs by {err:.3g} > {tol:.3g} x {scale:.3g}'


@pytest.fixture(scope='module')
def one_step(tmp_path_factory):
    """The step's outputs on one device, on jit(8 devices), pmap(8), and 2 processes x 4."""
    import functools
    import jax
    import step_worker
    from lmoe_jax import parallel, train
    method, batch = step_worker.method(), step_worker.global_batch()
    rng = jax.random.key(step_worker.STEP_RNG_SEED)
    state = step_worker.initial_state()
    out = {'one': step_worker.outputs(*jax.jit(functools.partial(train.train_step, method=method))(
        state, batch, rng))}
    out['jit'] = step_worker.jit_step_on_processes(0, 1)

    def pmap_outputs(bn_axis_name):
        step = parallel.pmap_train_step(method)
        local = {k: v.reshape(jax.local_device_count(), -1, *v.shape[1:]) for k, v in batch.items()}
        return step_worker.outputs(*step(step_worker.initial_state(bn_axis_name), local, rng))
    out['pmap'] = pmap_outputs(parallel.PMAP_AXIS)
    out['pmap_unsynced_bn'] = pmap_outputs(None)  # the control: BatchNorm per device
    path = tmp_path_factory.mktemp('step')
    run_processes('step_worker.py', lambda i, port: [str(i), '2', port, str(path / f'p{i}.npz')],
                  num=2)
    out['two'] = [dict(np.load(path / f'p{i}.npz')) for i in range(2)]
    return out, step_tolerance(state)


@pytest.mark.parametrize('layout', ['jit', 'pmap', 'two'])
def test_one_step_matches_one_device_within_the_rounding_bound(one_step, layout):
    """Gradients, updated params, BatchNorm statistics and loss terms of ONE step (lmoe, every
    term, per-example lam) on another layout vs one device, within ``step_tolerance``. One step
    only: after a few steps a ReLU or argmax flipped by rounding makes the runs diverge (the
    training is chaotic), and no rounding bound then holds."""
    out, tol = one_step
    got = out[layout]
    if layout == 'two':
        for key in got[0]:  # both processes hold the same replicated state, bit for bit
            np.testing.assert_array_equal(got[0][key], got[1][key], err_msg=key)
        got = got[0]
    assert_step_outputs_close(got, out['one'], tol, layout)


def test_the_step_bound_sees_unsynchronised_batchnorm(one_step):
    """The bound says something: pmap without BatchNorm averaged over the devices (statistics of
    2 examples per device, not 16) is far outside it."""
    out, tol = one_step
    with pytest.raises(AssertionError, match='differs by'):
        assert_step_outputs_close(out['pmap_unsynced_bn'], out['one'], tol, 'unsynced')
