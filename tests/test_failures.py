"""Failure paths keep their promises (issue 15): non-finite stops, preemption during evaluation,
and one clear `error:` line (exit 2, no traceback, nothing half-written) for each user mistake.

The reliability table in docs/training.md names these tests.
"""
import contextlib
import os
import signal
import subprocess

import jax
import numpy as np
import pytest

from lmoe_jax import checkpoint, trainer
from run_helpers import cli, env, final_params, tiny_config, write_data_dirs


@pytest.fixture(scope='module')
def data_dirs(tmp_path_factory):
    return write_data_dirs(tmp_path_factory.mktemp('failure_data'))


def _run_main(data_dirs, workdir, *extra, mode='train', timeout=300, config='configs/tiny.py'):
    command = [a for a in cli(data_dirs, str(workdir), *extra, config=config)
               if a != '--mode=train']
    out = subprocess.run(command + [f'--mode={mode}'], env=env(), capture_output=True, text=True,
                         timeout=timeout)
    return out


def _one_error_line(out) -> str:
    """exit 2, no traceback, exactly one `error:` line; returns it."""
    assert out.returncode == 2, f'rc={out.returncode}\n{out.stdout[-2000:]}\n{out.stderr[-3000:]}'
    assert 'Traceback' not in out.stderr + out.stdout, out.stderr[-3000:]
    errors = [line for line in out.stderr.splitlines() if line.startswith('error: ')]
    assert len(errors) == 1, out.stderr[-3000:]
    return errors[0]


def _no_leftovers(workdir):
    ckpt = checkpoint.checkpoint_dir(workdir)
    leftovers = [p.name for p in ckpt.iterdir() if 'tmp' in p.name] if ckpt.exists() else []
    assert not leftovers, leftovers


def _all_finite(tree) -> bool:
    return all(np.isfinite(x).all() for x in jax.tree.leaves(tree))


# ------------------------------------------------------------------ non-finite stops


def test_non_finite_fresh_run_ends_with_a_restorable_finite_checkpoint(data_dirs, tmp_path):
    """learning_rate=1e6: the stop waits for the save in flight and names what is really on disk."""
    workdir = tmp_path / 'lr1e6'
    out = _run_main(data_dirs, workdir, '--config.learning_rate=1e6')
    line = _one_error_line(out)
    assert 'non-finite values at step' in line
    assert 'loss/total' in line or 'grad_norm' in line or 'params' in line
    _no_leftovers(workdir)
    mngr = checkpoint.manager(workdir, read_only=True)
    steps = list(mngr.all_steps())
    mngr.close()
    if steps:  # what the message promises must be true on disk
        step, params = final_params(str(workdir))
        assert f'the latest checkpoint, step {step}, was read back from disk and is finite' in line
        assert 'the run resumes from that checkpoint' in line
        assert _all_finite(params)
    else:
        assert 'no checkpoint was saved yet' in line


def test_non_finite_stop_before_the_first_save_says_what_a_restart_does(data_dirs, tmp_path):
    """No save is due before step 12: the stop cannot promise a resume from a checkpoint."""
    workdir = tmp_path / 'no_save'
    out = _run_main(data_dirs, workdir, '--config.learning_rate=1e6',
                    '--config.checkpoint_every_steps=1000', '--config.eval_every_steps=1000')
    line = _one_error_line(out)
    assert 'non-finite values at step' in line
    assert 'no checkpoint was saved yet' in line
    assert 'resumes from that checkpoint' not in line
    assert 'the stage starts again from its initial weights' in line
    mngr = checkpoint.manager(workdir, read_only=True)
    assert list(mngr.all_steps()) == []
    mngr.close()


def test_non_finite_resumed_run_never_saves_nan_params(data_dirs, tmp_path):
    """Resume a healthy run with an exploding learning rate: NaN gradients stop it even where the
    loss is still finite; no NaN checkpoint is saved, none becomes "best", eval still works."""
    workdir = tmp_path / 'resumed'
    trainer.run(tiny_config(data_dirs, num_train_steps=4), str(workdir), 'train')
    good_step, good_params = final_params(str(workdir))
    out = _run_main(data_dirs, workdir, '--config.num_train_steps=12', '--config.learning_rate=1e8')
    line = _one_error_line(out)
    assert 'non-finite values at step' in line
    _no_leftovers(workdir)
    mngr = checkpoint.manager(workdir, read_only=True)
    for step in mngr.all_steps():
        assert _all_finite(checkpoint.read_variables(mngr, step)), f'step {step} is not finite'
    best = checkpoint.best_step(mngr)
    mngr.close()
    step, _ = final_params(str(workdir))
    assert f'the latest checkpoint, step {step}, was read back from disk and is finite' in line
    assert best in (good_step, step)
    metrics = trainer.evaluate_run(tiny_config(data_dirs, num_train_steps=12), str(workdir))
    assert 0.0 <= metrics['scores']['msp']['fine_mean']['openood_auroc'] <= 1.0


def test_a_zero_weight_term_cannot_stop_a_run(data_dirs, tmp_path):
    """LMoE gives the energy term weight 0: a NaN margin makes that term NaN, not the objective."""
    c = tiny_config(data_dirs, num_train_steps=4, **{'loss.m_in': float('nan')})
    summary = trainer.run(c, str(tmp_path / 'zero_weight'), 'train')
    assert summary['train']['steps'] == 4
    assert _all_finite(final_params(str(tmp_path / 'zero_weight'))[1])


def test_eval_refuses_a_non_finite_checkpoint(data_dirs, tmp_path):
    """A checkpoint written with NaN params (by an older version, say) is refused, not reported."""
    workdir = str(tmp_path / 'nan_ckpt')
    c = tiny_config(data_dirs, num_train_steps=4)
    trainer.run(c, workdir, 'train')
    setup = trainer.make_setup(c)
    state = trainer.initial_state(setup)
    poisoned = state.replace(step=state.step + 100,
                             params=jax.tree.map(lambda x: x * np.nan, state.params))
    mngr = checkpoint.manager(workdir)
    checkpoint.save(mngr, poisoned, trainer.config_to_dict(c), force=True)
    mngr.wait_until_finished()
    mngr.close()
    with pytest.raises(checkpoint.CheckpointError, match=r'step 100 .* holds non-finite values'):
        trainer.evaluate_run(c, workdir, step=100)
    out = _run_main(data_dirs, workdir, '--step=100', mode='eval')
    assert 'holds non-finite values' in _one_error_line(out)
    assert not os.path.exists(os.path.join(workdir, 'ood_report.json'))


# ------------------------------------------------------------------ preemption during evaluation


def test_sigterm_during_evaluation_stops_it_and_a_restart_redoes_it(data_dirs, tmp_path,
                                                                     monkeypatch):
    from lmoe_jax import data
    workdir = str(tmp_path / 'eval_term')
    c = tiny_config(data_dirs, num_train_steps=4)
    trainer.run(c, workdir, 'train')
    real = data.eval_datasets
    scored = []

    def eval_datasets_with_a_preemption(*args, **kwargs):
        sets = real(*args, **kwargs)

        def batches(first=sets[0]):
            for i, batch in enumerate(first.batches()):
                scored.append(i)
                if i == 1:  # a preemption notice arrives mid-set
                    os.kill(os.getpid(), signal.SIGTERM)
                yield batch
        return [sets[0]._replace(batches=batches), *sets[1:]]

    monkeypatch.setattr(data, 'eval_datasets', eval_datasets_with_a_preemption)
    summary = trainer.run(c, workdir, 'train_and_eval')
    assert summary['preempted'] and 'eval' not in summary
    assert len(scored) == 2  # stopped at the signal, not after the set or the whole evaluation
    assert not os.path.exists(os.path.join(workdir, 'ood_report.json'))
    monkeypatch.setattr(data, 'eval_datasets', real)
    summary = trainer.run(c, workdir, 'train_and_eval')  # nothing to train: redoes the evaluation
    assert os.path.getsize(os.path.join(workdir, 'ood_report.json')) > 0
    assert 0.0 <= summary['eval']['scores']['msp']['fine_mean']['openood_auroc'] <= 1.0


# ------------------------------------------------------------------ user errors: one line, exit 2


@contextlib.contextmanager
def _tmpfs(path, options):
    path.mkdir(parents=True, exist_ok=True)
    mounted = subprocess.run(['mount', '-t', 'tmpfs', '-o', options, 'tmpfs', str(path)],
                             capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f'cannot mount a tmpfs here (needs root): {mounted.stderr.decode().strip()}')
    try:
        yield path
    finally:
        subprocess.run(['umount', '-l', str(path)], check=True)


def test_a_config_file_that_does_not_exist(data_dirs, tmp_path):
    out = _run_main(data_dirs, tmp_path / 'err', config='/nonexistent/config.py')
    line = _one_error_line(out)
    assert 'cannot load the --config file' in line and '/nonexistent/config.py' in line


@pytest.mark.parametrize('extra,expected', [
    (['--config.loss.consistensy=1.0'], 'names no config field'),
    (['--config.data.image_size=40', '--config.data.resize_size=32'], 'resize_size=32 is smaller'),
    (['--config.data.num_id_classes=12'], 'num_id_classes=12 must be between 1 and num_classes=10'),
])
def test_user_errors_end_with_one_line(data_dirs, tmp_path, extra, expected):
    workdir = tmp_path / 'err'
    out = _run_main(data_dirs, workdir, *extra)
    assert expected in _one_error_line(out)
    assert not (workdir / 'checkpoints').exists()


def test_resuming_with_another_model_says_use_a_new_workdir(data_dirs, tmp_path):
    workdir = tmp_path / 'width'
    trainer.run(tiny_config(data_dirs, num_train_steps=4), str(workdir), 'train')
    out = _run_main(data_dirs, workdir, '--config.model.width=8', '--config.num_train_steps=8')
    line = _one_error_line(out)
    assert 'model.width=4' in line and 'model.width=8' in line
    assert 'use a new --workdir' in line and 'strict=False' not in out.stderr
    assert final_params(str(workdir))[0] == 4  # nothing of the refused run was saved


def test_read_only_workdir(data_dirs, tmp_path):
    with _tmpfs(tmp_path / 'ro', 'ro,size=1m') as ro:
        out = _run_main(data_dirs, ro / 'run')
        assert 'is not writable' in _one_error_line(out)


def test_full_disk_ends_with_one_line_and_no_half_written_checkpoint(data_dirs, tmp_path):
    """A 320 KiB filesystem fills during the run: one message, no *.orbax-checkpoint-tmp left,
    and every checkpoint left on it restores."""
    with _tmpfs(tmp_path / 'small', 'size=320k') as small:
        workdir = small / 'run'
        out = _run_main(data_dirs, workdir, '--config.num_train_steps=200',
                        '--config.checkpoint_every_steps=2', '--config.keep_checkpoints=100')
        line = _one_error_line(out)
        assert 'no space left on the device' in line
        # TensorFlow's summary writer ('Failed to flush N events ... Could not flush events
        # file') says the same in C++ log lines before ours: only with --verbose
        assert 'flush' not in out.stderr.lower(), out.stderr[-3000:]
        _no_leftovers(workdir)
        mngr = checkpoint.manager(workdir, read_only=True)
        for step in mngr.all_steps():
            checkpoint.read_variables(mngr, step)
        mngr.close()


def test_fractional_epochs_are_accepted(data_dirs, tmp_path):
    """--config.num_epochs=0.5 (and baseline_epochs) parse and give half an epoch of steps."""
    out = _run_main(data_dirs, tmp_path / 'half', '--config.num_train_steps=-1',
                    '--config.num_epochs=0.5', '--config.baseline_epochs=0.5')
    assert out.returncode == 0, out.stderr[-3000:]
    setup = trainer.make_setup(tiny_config(data_dirs))
    half = round(0.5 * setup.steps_per_epoch)
    assert f'[baseline] done: {half} steps' in out.stdout, out.stdout
    assert f'[lmoe] done: {half} steps' in out.stdout, out.stdout
