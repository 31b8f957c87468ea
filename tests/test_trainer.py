"""The trainer end to end: checkpoints, resume, SIGKILL/SIGTERM, config errors, stages, pmap,
non-finite stop, and a real two-process run on this machine."""
import copy
import os
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
import tensorflow_datasets as tfds

from configs import tiny
from lmoe_jax import checkpoint, trainer
from run_helpers import ROOT, cli, env, final_params, tiny_config, write_data_dirs


@pytest.fixture(scope='module')
def data_dirs(tmp_path_factory):
    return write_data_dirs(tmp_path_factory.mktemp('trainer_data'))


def assert_trees_equal(a, b):
    for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(x, y, err_msg=jax.tree_util.keystr(path))


@pytest.fixture(scope='module')
def uninterrupted(data_dirs, tmp_path_factory):
    """One uninterrupted 12-step subprocess run: the reference for SIGKILL and SIGTERM."""
    workdir = str(tmp_path_factory.mktemp('uninterrupted'))
    subprocess.run(cli(data_dirs, workdir), env=env(), check=True, capture_output=True,
                   timeout=300)
    return final_params(workdir)


def _wait_for_checkpoint(workdir, proc, min_step, timeout=240):
    t0 = time.time()
    ckpt = checkpoint.checkpoint_dir(workdir)
    while time.time() - t0 < timeout:
        if proc.poll() is not None:
            raise AssertionError(f'run ended early: {proc.stderr.read().decode()[-3000:]}')
        if os.path.isdir(ckpt) and any(d.isdigit() and int(d) >= min_step for d in os.listdir(ckpt)):
            return
        time.sleep(0.05)
    raise AssertionError('no checkpoint appeared')


# ------------------------------------------------------------------ crash safety (subprocesses)


def test_sigkill_mid_run_then_restart_ends_bit_identical(data_dirs, uninterrupted, tmp_path):
    workdir = str(tmp_path / 'killed')
    proc = subprocess.Popen(cli(data_dirs, workdir), env=env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    _wait_for_checkpoint(workdir, proc, min_step=4)
    proc.send_signal(signal.SIGKILL)  # anywhere: mid-step or mid-save
    proc.wait()
    subprocess.run(cli(data_dirs, workdir), env=env(), check=True, capture_output=True,
                   timeout=300)
    step, params = final_params(workdir)
    ref_step, ref_params = uninterrupted
    assert step == ref_step == 12
    assert_trees_equal(params, ref_params)


def test_sigterm_saves_and_exits_cleanly_then_resumes(data_dirs, uninterrupted, tmp_path):
    workdir = str(tmp_path / 'preempted')
    proc = subprocess.Popen(cli(data_dirs, workdir, '--config.checkpoint_every_steps=100',
                                '--config.eval_every_steps=100'),
                            env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    # wait until training is under way (first logged step), then preempt. A signal during the
    # compilation is honoured after the first step (a Python handler cannot cut into XLA).
    seen = []
    for line in proc.stdout:
        seen.append(line)
        if b'] step ' in line and b'steps/s' in line:
            break
    proc.send_signal(signal.SIGTERM)
    t0 = time.time()
    stdout, stderr = proc.communicate(timeout=120)
    stdout = b''.join(seen) + stdout
    exit_seconds = time.time() - t0
    assert proc.returncode == 0, stderr.decode()[-3000:]
    assert exit_seconds < 10, f'exited {exit_seconds:.1f} s after SIGTERM'  # a TPU VM gives ~30 s
    step, _ = final_params(workdir)  # a complete, restorable checkpoint
    assert 1 <= step <= 12
    if step < 12:
        assert f'stopped at step {step} on request; checkpoint step {step} is on disk'.encode() \
            in stdout
    subprocess.run(cli(data_dirs, workdir, '--config.checkpoint_every_steps=100',
                       '--config.eval_every_steps=100'), env=env(), check=True,
                   capture_output=True, timeout=300)
    assert_trees_equal(final_params(workdir)[1], uninterrupted[1])


def test_main_reports_config_errors_with_one_message(data_dirs, tmp_path):
    out = subprocess.run(cli(data_dirs, str(tmp_path / 'bad'), '--config.method=mixup_oe'),
                         env=env(), capture_output=True, timeout=120)
    assert out.returncode == 2
    assert 'unknown method' in out.stderr.decode() and 'valid methods' in out.stderr.decode()
    assert 'Traceback' not in out.stderr.decode()


# ------------------------------------------------------------------ in process


@pytest.mark.parametrize('override,message', [
    ({'method': 'mixup_oe'}, 'unknown method'),
    ({'model.name': 'vgg16'}, 'Unknown model name'),
    ({'loss.logit_mix': -1.0}, 'must be >= 0'),
    ({'batch_size': 12}, 'not divisible by the 8 devices'),
    ({'init_from': '/nonexistent/run'}, 'has no checkpoints/ folder'),
    ({'parallelism': 'pjit'}, 'parallelism'),
    ({'eval_every_steps': 0}, 'must be > 0'),
])
def test_each_config_error_has_its_message(data_dirs, override, message):
    with pytest.raises(trainer.ConfigError, match=message):
        trainer.validate_config(tiny_config(data_dirs, **override))


def test_train_resume_eval_under_mock_catalog_data(tmp_path):
    """A catalog config (CUB ID, DTD outliers, Flowers coarse OOD) through train -> resume -> eval."""
    c = tiny.get_config()
    c.data.update(dict(dataset='caltech_birds2011', num_classes=200, num_id_classes=150, split=0,
                       id_classes=None, outlier_dataset='dtd', coarse_ood=('oxford_flowers102',),
                       image_size=16, resize_size=20, grayscale=False, normalize='imagenet',
                       color_jitter=True, val_fraction=0.2, cache=False, data_dir=None))
    c.num_train_steps = 4
    workdir = str(tmp_path / 'cub')
    with tfds.testing.mock_data(num_examples=200):
        trainer.run(c, workdir, 'train')
        assert checkpoint.manager(workdir, read_only=True).latest_step() == 4
        c2 = copy.deepcopy(c)
        c2.num_train_steps = 8
        summary = trainer.run(c2, workdir, 'train_and_eval')  # resumes at 4
    assert summary['train']['steps'] == 8
    for name in ('ood_report.json', 'ood_report.md', 'ood_report.csv'):
        assert os.path.getsize(os.path.join(workdir, name)) > 0
    metrics = summary['eval']
    assert {'msp', 'energy'} <= set(metrics['scores'])
    assert 0.0 <= metrics['scores']['msp']['fine_mean']['openood_auroc'] <= 1.0


def test_two_stage_run_and_init_from_refuses_another_model(data_dirs, tmp_path):
    c = tiny_config(data_dirs, baseline_epochs=1, num_train_steps=4)
    workdir = str(tmp_path / 'two_stage')
    summary = trainer.run(c, workdir, 'train')
    base = os.path.join(workdir, 'baseline')
    # one epoch of the ID training images (the head 80% of TFDS's train split; 20% is validation)
    labels = [int(ex['label']) for ex in tfds.as_numpy(tfds.load(
        'fashion_mnist_idx', split='train[:320]', data_dir=data_dirs['data_dir']))]
    assert summary['baseline']['steps'] == sum(l in (0, 1, 2, 3, 8, 9) for l in labels) // 16
    base_step, base_params = final_params(base)
    step, params = final_params(workdir)
    assert step == 4
    # stage 2 starts from the baseline weights: 4 small steps away from them, not from scratch
    diff = np.abs(params['fc']['kernel'] - base_params['fc']['kernel']).max()
    assert 0 < diff < 0.5
    wider = tiny_config(data_dirs, init_from=base, **{'model.width': 8})
    with pytest.raises(checkpoint.CheckpointError, match='model.width=4'):
        trainer.run(wider, str(tmp_path / 'wider'), 'train')


def test_pmap_and_jit_both_train_and_checkpoint(data_dirs, tmp_path):
    """Not numerics (tests/test_equivalence.py compares one step of each layout): both modes
    train and write a checkpoint that restores to finite parameters of the same structure."""
    results = {}
    for mode in ('jit', 'pmap'):
        workdir = str(tmp_path / mode)
        trainer.run(tiny_config(data_dirs, parallelism=mode, num_train_steps=6), workdir, 'train')
        results[mode] = final_params(workdir)
    assert results['jit'][0] == results['pmap'][0] == 6
    assert jax.tree.structure(results['jit'][1]) == jax.tree.structure(results['pmap'][1])
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(results['pmap'][1]))


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(data_dirs, tmp_path):
    workdir = str(tmp_path / 'nan')
    trainer.run(tiny_config(data_dirs, num_train_steps=4, method='energy_oe'), workdir, 'train')
    good_step, good_params = final_params(workdir)
    poisoned = tiny_config(data_dirs, num_train_steps=8, method='energy_oe',
                           **{'loss.m_in': float('nan')})
    with pytest.raises(trainer.NonFiniteLossError, match=r'step 5: loss/total = nan') as e:
        trainer.run(poisoned, workdir, 'train')
    assert 'the latest checkpoint, step 4, was read back from disk and is finite' in str(e.value)
    step, params = final_params(workdir)
    assert step == good_step == 4
    assert_trees_equal(params, good_params)


# ------------------------------------------------------------------ two processes, one machine


def _free_port():
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def _two_processes(data_dirs, workdir, steps, *extra):
    """2 processes x 4 CPU devices (gloo, loopback coordinator); returns their stdouts."""
    port = _free_port()
    procs = [subprocess.Popen(
        cli(data_dirs, workdir, f'--config.num_train_steps={steps}', '--config.data.val_fraction=0.0',
            *extra, f'--coordinator_address=127.0.0.1:{port}', '--num_processes=2',
            f'--process_id={i}'),
        env=env(devices=4, JAX_CPU_COLLECTIVES_IMPLEMENTATION='gloo'),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE) for i in range(2)]
    outs = []
    for p in procs:
        out, err = p.communicate(timeout=400)
        assert p.returncode == 0, err.decode()[-4000:]
        outs.append(out.decode())
    return outs


EVAL_SCORES = "('msp','energy','kl_matching','mahalanobis')"


def test_two_processes_save_restore_train_and_eval_then_eval_again(data_dirs, tmp_path):
    """One workdir, three two-process commands (gloo; numerics are tests/test_equivalence.py's):
    1. train 6 steps, each process reading its own half of every global batch;
    2. the same run to 8 steps with --mode=train_and_eval: both processes restore step 6, train,
       return, and process 0 alone prints the report (ID validation, fine and coarse OOD sets);
    3. --mode=eval alone (config read from the checkpoint) writes the report again.
    Then one process (8 devices) evaluating the same checkpoint scores every image the same up
    to float32 rounding (the forward runs on another device layout), and from the same scores
    the one-process metrics code gives the two-process report's metrics to 1e-6."""
    import json
    from lmoe_jax import evaluate
    workdir = str(tmp_path / 'multi')
    common = ('--config.data.val_fraction=0.2', f'--config.scores={EVAL_SCORES}')
    _two_processes(data_dirs, workdir, 6, *common)
    assert final_params(workdir)[0] == 6
    outs = _two_processes(data_dirs, workdir, 8, *common, '--mode=train_and_eval')
    assert f'resumed from {checkpoint.checkpoint_dir(workdir)} at step 6' in outs[0], outs[0]
    step, params = final_params(workdir)
    assert step == 8 and all(np.isfinite(x).all() for x in jax.tree.leaves(params))
    assert 'OOD report of' in outs[0] and 'OOD report of' not in outs[1]
    assert '[lmoe]' not in outs[1] and '[eval]' not in outs[1], outs[1]  # process 0 alone talks
    report = os.path.join(workdir, 'ood_report.json')
    with open(report) as f:
        multi = json.load(f)
    with np.load(os.path.join(workdir, 'ood_scores.npz')) as npz:
        multi_scores = {k: npz[k] for k in npz.files}
    assert set(multi['kinds'].values()) == {'id', 'fine_ood', 'coarse_ood'}

    os.remove(report)
    port = _free_port()
    procs = [subprocess.Popen(
        [sys.executable, os.path.join(ROOT, 'main.py'), f'--workdir={workdir}', '--mode=eval',
         f'--coordinator_address=127.0.0.1:{port}', '--num_processes=2', f'--process_id={i}'],
        env=env(devices=4, JAX_CPU_COLLECTIVES_IMPLEMENTATION='gloo'),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE) for i in range(2)]
    for p in procs:
        _, err = p.communicate(timeout=400)
        assert p.returncode == 0, err.decode()[-4000:]
    with open(report) as f:
        assert json.load(f)['scores'] == multi['scores']  # same checkpoint, same layout

    c = tiny_config(data_dirs, num_train_steps=8, scores=tuple(eval(EVAL_SCORES)),
                    **{'data.val_fraction': 0.2})
    single = trainer.evaluate_run(c, workdir)
    with np.load(os.path.join(workdir, 'ood_scores.npz')) as npz:
        single_scores = {k: npz[k] for k in npz.files}
    assert multi['num_images'] == single['num_images']
    assert multi['id_accuracy'] == pytest.approx(single['id_accuracy'], abs=1e-6)
    assert set(multi_scores) == set(single_scores)
    # rows come in another order: compare sorted. float32 rounding of the forward on another
    # device layout: 1-2 ulp for the logit scores; Mahalanobis (a float32 quadratic form that
    # cancels large terms) moves by ~6e-6 of its scale.
    for key, values in single_scores.items():
        scale = float(np.max(np.abs(values)))
        np.testing.assert_allclose(np.sort(multi_scores[key]), np.sort(values),
                                   rtol=0, atol=1e-5 * scale + 1e-6, err_msg=key)

    set_scores = {}
    for key, values in multi_scores.items():
        name, score = key.split('/')
        set_scores.setdefault(name, {})[score] = values
    again = evaluate.build_metrics(set_scores, multi['kinds'], multi['id_set'],
                                   multi['id_accuracy'], seed=0)
    for score, rows in again['scores'].items():
        for row, values in rows.items():
            for key, value in values.items():
                assert multi['scores'][score][row][key] == pytest.approx(value, abs=1e-6), \
                    (score, row, key)


def test_cub_config_with_pretrained_weights_starts_from_them(tmp_path):
    """configs/cub.py (shrunk: ResNet-18 width 8, 16 px, mock data) with model.pretrained set:
    the initial state holds the file's backbone weights and BN statistics, a fresh head, and trains."""
    from safetensors.numpy import save_file
    from test_pretrained import _init, _torchvision_state
    from configs import cub

    _, shapes = _init('resnet18', width=8, num_classes=1000, size=16)
    state_dict = _torchvision_state(shapes, seed=3)
    path = str(tmp_path / 'resnet18.safetensors')
    save_file(state_dict, path)
    c = cub.get_config()
    c.model.update(dict(name='resnet18', width=8, dtype='float32', pretrained=path))
    c.data.update(dict(image_size=16, resize_size=20, val_fraction=0.0, coarse_ood=('dtd',),
                       coarse_ood_subsample=False))
    c.update(dict(batch_size=8, baseline_epochs=0, num_train_steps=2, eval_batch_size=16,
                  log_every_steps=1, scores=('msp',)))
    with tfds.testing.mock_data(num_examples=40):
        setup = trainer.make_setup(c)
        state = trainer.initial_state(setup)
        params, stats = jax.device_get(state.params), jax.device_get(state.batch_stats)
        # torchvision OIHW -> flax HWIO, BN weight/running_var -> scale/var
        np.testing.assert_array_equal(params['conv1']['kernel'],
                                      state_dict['conv1.weight'].transpose(2, 3, 1, 0))
        np.testing.assert_array_equal(params['layer2_0']['downsample_1']['scale'],
                                      state_dict['layer2.0.downsample.1.weight'])
        np.testing.assert_array_equal(stats['layer4_1']['bn2']['var'],
                                      state_dict['layer4.1.bn2.running_var'])
        assert params['fc']['kernel'].shape == (64, 150)  # head re-initialised for 150 ID classes
        summary = trainer.run(c, str(tmp_path / 'cub'), 'train')
    assert summary['train']['steps'] == 2


# ------------------------------------------------------------------ stages


def test_stage_one_is_a_cross_entropy_baseline_whatever_the_loss_overrides(data_dirs):
    from lmoe_jax import losses
    c = tiny_config(data_dirs, baseline_epochs=1.0, **{'loss.consistency': 0.1,
                                                       'loss.energy': 2.0, 'loss.mix': 'cutmix'})
    stage = trainer.baseline_stage_config(c)
    method = trainer.method_from_config(stage)
    baseline = losses.get_method('baseline', {})
    assert method == baseline
    assert stage.method == 'baseline' and all(v is None for v in stage.loss.to_dict().values())
    assert trainer.method_from_config(c).weights.consistency == 0.1  # stage 2 keeps them


def test_stage_two_starts_from_the_best_stage_one_checkpoint(data_dirs, tmp_path):
    """Two checkpoints with different weights; the one with higher validation accuracy is the
    earlier one: init_from loads it, not the latest."""
    c = tiny_config(data_dirs, num_train_steps=8)
    base = str(tmp_path / 'base')
    setup = trainer.make_setup(c)
    state = trainer.initial_state(setup)
    mngr = checkpoint.manager(base)
    best = state.replace(step=state.step + 4, params=jax.tree.map(lambda x: x + 1.0, state.params))
    latest = state.replace(step=state.step + 8, params=jax.tree.map(lambda x: x - 1.0, state.params))
    config_dict = trainer.config_to_dict(c)
    checkpoint.save(mngr, best, config_dict, val_accuracy=0.9, force=True)
    checkpoint.save(mngr, latest, config_dict, val_accuracy=0.5, force=True)
    mngr.wait_until_finished()
    mngr.close()
    loaded, step = checkpoint.load_variables_from(base, state, expect=trainer._identity(c))
    assert step == 4
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b) + 1.0),
                 loaded.params, state.params)


def test_resume_does_not_need_the_imagenet_weights(data_dirs, tmp_path, monkeypatch):
    """A resumed run (and a fine-tune) replaces every weight: it must not load ImageNet weights
    (an offline VM resuming with a hub id in its config would fail for nothing)."""
    from lmoe_jax.models import pretrained
    workdir = str(tmp_path / 'resume_offline')
    trainer.run(tiny_config(data_dirs, num_train_steps=4), workdir, 'train')

    def offline(*args, **kwargs):
        raise AssertionError('ImageNet weights were loaded on resume')
    monkeypatch.setattr(pretrained, 'maybe_load_pretrained', offline)
    c = tiny_config(data_dirs, num_train_steps=6, **{'model.pretrained': 'hub:some/offline-id'})
    assert trainer.run(c, workdir, 'train')['train']['steps'] == 6
    c2 = tiny_config(data_dirs, num_train_steps=2, init_from=workdir,
                     **{'model.pretrained': 'hub:some/offline-id'})
    assert trainer.run(c2, str(tmp_path / 'finetune'), 'train')['train']['steps'] == 2


def test_one_compilation_per_stage(data_dirs, tmp_path):
    """The train step compiles once per stage, across logging, checkpoint saves and validation."""
    import logging as pylogging
    compiled = []

    class Catch(pylogging.Handler):
        def emit(self, record):
            message = record.getMessage()
            if message.startswith('Compiling') and 'train_step' in message:
                compiled.append(message)
    handler = Catch()
    pylogging.getLogger('jax').addHandler(handler)
    try:
        with jax.log_compiles(True):
            c = tiny_config(data_dirs, baseline_epochs=0.2, num_train_steps=8,
                            log_every_steps=1, eval_every_steps=2, checkpoint_every_steps=2,
                            compilation_cache_dir='')
            trainer.run(c, str(tmp_path / 'compiles'), 'train')
    finally:
        pylogging.getLogger('jax').removeHandler(handler)
    assert len(compiled) == 2, compiled  # baseline stage, LMoE stage


def test_metric_accumulator_averages_every_metric_over_the_log_interval():
    rng = np.random.default_rng(0)
    steps = [{'loss/total': np.float32(rng.normal()), 'accuracy': np.float32(rng.uniform()),
              'lam': np.float32(rng.uniform())} for _ in range(5)]
    accumulate, collection = trainer.make_metric_accumulator(steps[0]), None
    for metrics in steps:
        collection = accumulate(collection, {k: jax.numpy.asarray(v) for k, v in metrics.items()})
    got = trainer.collection_to_scalars(collection)
    for name in steps[0]:
        np.testing.assert_allclose(got[f'train/{name}'], np.mean([m[name] for m in steps]),
                                   rtol=1e-6)


def test_compilation_cache_dir_from_the_config_else_the_environment_else_the_workdir(
        tmp_path, monkeypatch):
    before = jax.config.jax_compilation_cache_dir
    try:
        monkeypatch.setenv('JAX_COMPILATION_CACHE_DIR', str(tmp_path / 'env'))
        trainer.enable_compilation_cache(tiny.get_config(), str(tmp_path / 'work'))
        assert jax.config.jax_compilation_cache_dir == str(tmp_path / 'env')
        c = tiny.get_config()
        c.compilation_cache_dir = str(tmp_path / 'mine')
        trainer.enable_compilation_cache(c, str(tmp_path / 'work'))
        assert jax.config.jax_compilation_cache_dir == str(tmp_path / 'mine')
        monkeypatch.delenv('JAX_COMPILATION_CACHE_DIR')
        trainer.enable_compilation_cache(tiny.get_config(), str(tmp_path / 'work'))
        assert jax.config.jax_compilation_cache_dir == str(tmp_path / 'work' / 'jax_cache')
    finally:
        jax.config.update('jax_compilation_cache_dir', before)
