"""benchmarks/: the FLOP count, the GPU script's plan and time guard, and a --smoke run.

The reference values are written out here: torchvision's published multiply-add counts, XLA's
own count of the lowered model, and plans worked by hand for a fake runner.
"""
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest
from etils import epath

ROOT = epath.Path(__file__).resolve().parent.parent
sys.path.insert(0, os.fspath(ROOT / 'benchmarks'))

import common  # noqa: E402
import gpu  # noqa: E402

FORBIDDEN = ('tensorflow', 'tensorflow_datasets', 'clu', 'ml_collections')


# ----------------------------------------------------------------- FLOPs and passes

@pytest.mark.parametrize('name,gmacs', [
    # torchvision's model cards (ResNet*_Weights.IMAGENET1K_V1.meta['_ops'], multiply-adds).
    ('resnet18', 1.814), ('resnet34', 3.664), ('resnet50', 4.089)])
def test_forward_flops_match_torchvision_published_counts(name, gmacs):
    flops = common.resnet_forward_flops(name, 224, 1000)
    assert flops / 2 / 1e9 == pytest.approx(gmacs, rel=1e-3)


def test_forward_flops_agree_with_xla_count_of_the_lowered_model():
    """XLA's cost analysis of the lowered ResNet-50 forward at 224 px is 2.8% below the analytic
    count: it counts only the kernel taps that land on pixels (the zero padding of every 3x3/7x7
    convolution is left out; the analytic count, like torchvision's, includes it), and adds
    BatchNorm, ReLU and pooling. Within [0.95, 1.0] rules out a missing or doubled layer."""
    from lmoe_jax.models import create_model
    model = create_model({'name': 'resnet50', 'matmul_convs': False}, 1000)
    x = jnp.zeros((1, 224, 224, 3))
    v = jax.eval_shape(lambda: model.init(jax.random.key(0), x, train=False))
    xla = jax.jit(lambda v: model.apply(v, x)).lower(v).cost_analysis()['flops']
    assert 0.95 <= xla / common.resnet_forward_flops('resnet50', 224, 1000) <= 1.0


def test_forward_passes_follow_the_objective():
    # ID batch, + outliers (OE, EnergyOE, LMoE's logit mixture), + mixed batch (MixOE, LMoE).
    expected = {'baseline': 1, 'oe': 2, 'energy_oe': 2, 'mixoe_mixup': 2, 'mixoe_cutmix': 2,
                'lmoe': 3}
    assert {m: common.forward_passes(m) for m in expected} == expected


def test_throughput_and_peak_fraction():
    r = {'status': 'ok', 'batch_size': 64, 'passes': 3, 'step_s_median': 0.1,
         'xla_flops_lowered': 4.8e12}
    gpu.add_throughput(r, 8.0e9, 989.4)
    # 3 (fwd + bwd) x 8 GFLOPs x 64 images x 3 passes = 4.608 TFLOP per step, in 0.1 s.
    assert r['model_flops_per_step'] == pytest.approx(4.608e12)
    assert r['tflops'] == pytest.approx(46.08)
    assert r['peak_fraction'] == pytest.approx(46.08 / 989.4)
    assert r['xla_flops_over_analytic'] == pytest.approx(4.8 / 4.608)
    assert gpu.peak_tflops('NVIDIA H200', None)[0] == 989.4
    assert gpu.peak_tflops('NVIDIA H200 NVL', None)[0] == 835.6
    assert gpu.peak_tflops('cpu', None)[0] is None
    assert gpu.peak_tflops('cpu', 100.0)[0] == 100.0


# ----------------------------------------------------------------- the plan (fake runner)

OPTS = dict(gpu.FULL, budget_s=1000.0, min_case_s=10.0, max_batch=1024)


class FakeRunner:
    """Each case costs `cost_s` on a fake clock; peak = 1000 + 10 B MiB of 5000 MiB; `oom(spec)`
    decides which cases run out of memory."""

    def __init__(self, cost_s=1.0, oom=lambda spec: False, timed_out=lambda spec: False):
        self.now, self.cost_s, self.calls = 0.0, cost_s, []
        self.oom, self.timed_out = oom, timed_out

    def clock(self):
        return self.now

    def __call__(self, spec, timeout_s):
        self.calls.append((spec['runner'], spec['method'], spec['batch_size'], spec['purpose']))
        self.now += min(self.cost_s, timeout_s)
        if self.timed_out(spec):
            return dict(spec, error='timed out', timed_out=True)
        if self.oom(spec):
            return dict(spec, error='RESOURCE_EXHAUSTED: out of memory', oom=True)
        b = spec['batch_size']
        return dict(spec, step_s_median=0.01 * b, passes=common.forward_passes(spec['method']),
                    peak_mib=1000.0 + 10.0 * b, memory_limit_mib=5000.0)


def test_plan_searches_doubling_and_stops_before_a_predicted_oom():
    fake = FakeRunner()
    run = gpu.benchmark(OPTS, fake, runners=list(gpu.RUNNERS), methods=list(gpu.METHODS),
                        clock=fake.clock)
    fixed = [(r, m, 64, 'fixed') for m in gpu.METHODS for r in gpu.RUNNERS]
    # peak(128) = 2280, peak(256) = 3560 MiB; 512 would need 3560 + 10 x 256 = 6120 > 0.97 x 5000.
    search = [(r, 'lmoe', b, 'search') for r in ('jax', 'torch-eager') for b in (128, 256)]
    largest = [('torch-compile', 'lmoe', 256, 'largest')] + [
        (r, m, 256, 'largest') for m in ('mixoe_mixup', 'baseline') for r in gpu.RUNNERS]
    assert fake.calls == fixed + search + largest
    assert run['largest_batch'] == {'jax': 256, 'torch-eager': 256, 'torch-compile': 256}
    assert 'B=512 predicted to need 6.0 GiB of 4.9 GiB' in run['search_stopped']['jax']
    assert all(r['status'] == 'ok' for r in run['results'])


def test_plan_stops_the_search_at_an_out_of_memory_step():
    fake = FakeRunner(oom=lambda s: s['runner'] == 'torch-eager' and s['batch_size'] >= 256)
    run = gpu.benchmark(OPTS, fake, runners=['jax', 'torch-eager'], methods=['lmoe'],
                        clock=fake.clock)
    assert run['largest_batch'] == {'jax': 256, 'torch-eager': 128}
    assert run['search_stopped']['torch-eager'] == 'B=256: oom: RESOURCE_EXHAUSTED: out of memory'
    oom = [r for r in run['results'] if r['status'] == 'oom']
    assert [(r['runner'], r['batch_size']) for r in oom] == [('torch-eager', 256)]


def test_time_guard_skips_what_does_not_fit_and_marks_a_cut_case():
    # 3 s budget, 1 s per case, 0.5 s minimum to start: cases 1-3 run, the rest are skipped.
    fake = FakeRunner(timed_out=lambda s: s['method'] == 'mixoe_mixup')
    opts = dict(OPTS, budget_s=3.0, min_case_s=0.5)
    run = gpu.benchmark(opts, fake, runners=['jax'], methods=list(gpu.METHODS), clock=fake.clock)
    assert fake.calls == [('jax', 'lmoe', 64, 'fixed'), ('jax', 'mixoe_mixup', 64, 'fixed'),
                          ('jax', 'baseline', 64, 'fixed')]
    statuses = [(r['method'], r['batch_size'], r['status']) for r in run['results']]
    assert statuses == [('lmoe', 64, 'ok'), ('mixoe_mixup', 64, 'cut'), ('baseline', 64, 'ok'),
                        ('lmoe', 128, 'skipped')]
    assert 'time budget spent' in run['results'][-1]['reason']
    md = gpu.report(run, {'title': 't', 'peak_source': 'p', 'flops_basis': 'f'})
    assert 'not measured (2)' in md and 'cut by the time guard' in md


def test_unavailable_runner_is_reported_not_run():
    fake = FakeRunner()
    run = gpu.benchmark(OPTS, fake, runners=['jax', 'torch-eager'], methods=['baseline'],
                        search=False, unavailable={'torch-eager': 'skipped: torch not importable'},
                        clock=fake.clock)
    assert fake.calls == [('jax', 'baseline', 64, 'fixed')]
    assert run['results'][1]['status'] == 'skipped'
    assert run['results'][1]['reason'] == 'skipped: torch not importable'


def test_predicted_peak_is_the_line_through_the_last_two_points():
    assert gpu.predicted_peak_mib([(64, 1640.0)], 128) is None
    assert gpu.predicted_peak_mib([(64, 1640.0), (128, 2280.0)], 256) == pytest.approx(3560.0)


# ----------------------------------------------------------------- the PyTorch side (needs torch)

def test_torch_small_cnn_twin_has_the_jax_parameter_count():
    pytest.importorskip('torchvision')
    import numpy as np
    import torch_reference
    from lmoe_jax.models import create_model
    model = create_model({'name': 'small_cnn'}, 10)
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 28, 28, 1))))
    jax_count = sum(int(np.prod(a.shape)) for a in jax.tree.leaves(shapes['params']))
    twin = torch_reference.build_model('small_cnn', 10, 1)
    assert sum(p.numel() for p in twin.parameters()) == jax_count


@pytest.mark.parametrize('method', ['baseline', 'oe', 'energy_oe', 'mixoe_mixup', 'lmoe'])
def test_torch_objective_equals_the_library_loss(method):
    """The PyTorch step optimises the same objective as lmoe_jax (same logits, lam, labels)."""
    torch = pytest.importorskip('torch')
    import numpy as np
    import torch_reference
    from lmoe_jax import losses
    rng = np.random.default_rng(0)
    z_id, z_ood, z_mix = (rng.normal(size=(6, 5)).astype(np.float32) for _ in range(3))
    labels, lam = rng.integers(0, 5, 6), 0.3
    m = losses.get_method(method)
    expected, _ = losses.oe_family_loss(
        logits_id=z_id, logits_ood=z_ood if m.needs_ood else None,
        logits_mix=z_mix if m.needs_mix else None, labels=labels, lam=lam, weights=m.weights)
    t = lambda a: torch.from_numpy(a)  # noqa: E731
    got = torch_reference.objective(m.weights, t(z_id), t(z_ood) if m.needs_ood else None,
                                    t(z_mix) if m.needs_mix else None, t(labels), lam, 5)
    assert float(got) == pytest.approx(float(expected), rel=1e-5)


# ----------------------------------------------------------------- the scripts themselves

def _env():
    env = {k: v for k, v in os.environ.items() if k != 'XLA_FLAGS'}
    env['PYTHONPATH'] = os.fspath(ROOT)
    return env


def test_gpu_script_and_library_import_no_tensorflow_clu_or_ml_collections():
    """The GPU machine has jax/flax/optax/orbax/chex/numpy/torch but not these."""
    code = ('import sys; sys.path.insert(0, "benchmarks"); '
            'import gpu, common, jax_step, torch_reference; '
            'import lmoe_jax.models, lmoe_jax.train, lmoe_jax.parallel, lmoe_jax.losses; '
            f'print(sorted(m for m in sys.modules if m.split(".")[0] in {FORBIDDEN!r}))')
    out = subprocess.run([sys.executable, '-c', code], cwd=ROOT, env=_env(), capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == '[]'


@pytest.mark.parametrize('script', ['train_step.py', 'conv_ab.py', 'gpu.py'])
def test_benchmark_scripts_start(script):
    out = subprocess.run([sys.executable, os.fspath(ROOT / 'benchmarks' / script), '--help'],
                         cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert 'usage:' in out.stdout


def test_gpu_smoke_run_writes_json_and_markdown(tmp_path):
    """`gpu.py --smoke` end to end on CPU (small_cnn, 32 px, B=8, 2 steps): the real workers,
    the report files, PyTorch either measured or reported as skipped."""
    cmd = [sys.executable, os.fspath(ROOT / 'benchmarks' / 'gpu.py'), '--smoke',
           f'--out={tmp_path}']
    out = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    data = json.loads((tmp_path / 'gpu.json').read_text())
    assert data['info']['finished'] is True
    rows = {(r['runner'], r['method']): r for r in data['results']}
    assert set(rows) == {(r, m) for r in gpu.RUNNERS for m in ('lmoe', 'baseline')}
    for method, passes in (('lmoe', 3), ('baseline', 1)):
        r = rows['jax', method]
        assert r['status'] == 'ok', r
        assert r['passes'] == passes and r['batch_size'] == 8 and len(r['step_s_all']) == 2
        assert r['fwd_img_s'] == pytest.approx(passes * r['id_img_s'])
        assert r['id_img_s'] == pytest.approx(8 / r['step_s_median'])
        assert r['backend'] == 'cpu' and r['compile_s'] > 0
    torch_missing = any(common_missing(m) for m in ('torch', 'torchvision'))
    for runner in ('torch-eager', 'torch-compile'):
        r = rows[runner, 'lmoe']
        if torch_missing:
            assert r['status'] == 'skipped' and 'not importable' in r['reason']
        else:
            assert r['status'] == 'ok', r
    md = (tmp_path / 'gpu.md').read_text()
    assert '| runner | method | B |' in md and 'largest LMoE batch, jax' in md


def common_missing(module: str) -> bool:
    import importlib.util
    return importlib.util.find_spec(module) is None
