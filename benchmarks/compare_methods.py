"""Paired comparison of the OE-family presets and the LMoE ablation on the Fashion-MNIST demo,
trained and evaluated by the product's own code (``lmoe_jax.trainer``, what ``main.py`` runs).

The demo config's own protocol (configs/fashion_mnist.py), per seed ``s``, as ``trainer.run``
runs it for one method (its ``_run_stages``), but with one stage 1 shared by every variant:

1. stage 1, ONCE per seed: ``trainer.train_stage(trainer.baseline_stage_config(config),
   <seed>/baseline)``: cross-entropy for the config's ``baseline_epochs`` (5 epochs), its
   checkpoints, its validation accuracy. The row ``stage1`` is ``trainer.evaluate_run`` of it.
2. stage 2, every variant: ``trainer.train_stage(config, <seed>/<variant>)`` with
   ``config.method`` / ``config.loss`` = the variant and ``config.init_from`` = that baseline
   workdir, so each one starts from the same (best by ID validation accuracy) stage-1
   checkpoint with a fresh optimiser and schedule, for the config's ``num_epochs`` (2 epochs).
   Pairing comes from the trainer itself: the train stream is a function of ``config.seed`` and
   the step only (``data.train_stream(seed, start_step)``; stage 2 starts at step 0), and the
   step key is ``fold_in(key(seed), 1)`` with the step folded in by ``train_step``, so every
   variant of a seed sees the same ID batches, augmentation, outlier draws and (mixup, one lam
   per step) the same lam at each step. tests/test_study.py records them through the runner.
3. evaluation of the checkpoint ``main.py`` evaluates (the best by ID validation accuracy):
   * test (reported only): ``trainer.evaluate_run`` itself, MSP and Energy (``config.scores``),
     OpenOOD convention (OOD positive): ID test, fine-grained OOD test, coarse OOD; its report
     (ood_report.{json,md,csv}, ood_scores.npz, plots) lands in the variant's workdir as for
     ``main.py --mode=eval``, and the record's 'test' numbers are that report's;
   * validation, the only sets that choose anything: ID val (held-out share of ID train) against
     outlier val (held-out auxiliary outliers the train stream never draws);
   * a diagnostic reported apart and never used to choose ('fine_ood_diag': training images of
     the held-out classes, i.e. of the classes the test calls OOD), a fixed random subset.
   Validation and diagnostic go through ``lmoe_jax.evaluate``'s own steps (``make_forward``,
   ``model_outputs``, ``score_outputs``, ``build_metrics``) on the same checkpoint
   (``trainer.restore_for_evaluation``); that pass recomputes the test metrics too, which must
   equal evaluate_run's report to 1e-9 (else the run stops: the arrays are not of that model).

The ablation seeds (``--ablation_seeds``, default 0,1,2) run first with every variant; their
validation numbers choose the lmoe candidate (``select_lmoe``), which then also runs on the
remaining seeds with the main variants. The class split is an argument (``--id_classes`` or
``--split=N``). Everything goes to ``--out``: one JSON line per finished (seed, variant) in
``results.jsonl`` (a rerun skips what is there for the same protocol, so the script resumes),
the per-image logits and scores of that run in ``scores_seed<s>_<variant>.npz`` beside it, and
``tables.md``. ``--summarize`` only reads the JSONL and writes the tables.

Caches, under ``--workdir`` (default runs/compare) in folders named by a hash of the config they
hold: the stage-1 run of each seed (trained once, reused by every variant and every rerun) and
each variant's stage-2 run (a study killed mid-run resumes it from its last checkpoint; one
killed during the evaluation re-evaluates without retraining), the XLA compilation cache, and
in memory the decoded eval sets (the diagnostic cut to its subset before any forward pass).

Not shared with the trainer, and why:
* the second pass over the eval sets: ``evaluate_run`` scores only ``data.eval_datasets`` and
  returns metrics, not per-image logits; validation, the diagnostic and the npz need the
  model's outputs, so the study takes the checkpoint evaluate_run scores from
  ``trainer.restore_for_evaluation`` and runs evaluate's steps on its own sets (the cost: one
  more forward pass over the test sets per run, a few seconds; the trainer has no extra-sets
  hook by the lead's choice).
* the training terms in the record are the trainer's logged interval means (read back from its
  TensorBoard files), no longer a per-step tail: the trainer's loop keeps no per-step metrics.
* the per-seed pairing of several variants, the stage-1 sharing, the run order, the selection
  rule and the tables are the study's: the trainer runs one method per workdir.
* ``config.scores`` is ('msp', 'energy'), not the demo's nine: the study reports those two and
  the others (ODIN, fitted scores) would cost a pass over ID train per run.

    .venv/bin/python benchmarks/compare_methods.py --out=benchmarks/results/study_split0 --id_classes=0,1,2,3,8,9
    .venv/bin/python benchmarks/compare_methods.py --out=benchmarks/results/study_mixoe_split1 --split=1
    .venv/bin/python benchmarks/compare_methods.py --out=... --summarize   # tables only
    .venv/bin/python benchmarks/compare_methods.py --smoke   # 1 seed, a few steps, 3 variants

Re-running split 0 on this path (issue 21), the README's command into the README's folder once
the standalone loop's evidence has moved aside (the study refuses to overwrite the per-image
files of another protocol's records):

    git mv benchmarks/results/study_split0 benchmarks/results/study_split0_standalone
    flock /work/coord/heavy.lock .venv/bin/python benchmarks/compare_methods.py \
        --out=benchmarks/results/study_split0 --id_classes=0,1,2,3,8,9

Time, measured on the product path (2-core AMD EPYC, load 1.1-2.9): split 0's seeds 0-2 with
the main and cap variants (3 stage-1 + 27 variant runs) took 92.7 min, i.e. ~31 min per seed;
one more variant on 3 seeds 12.2 min (~4 min a run: ~36-38 s of it fixed cost, set-up, stream
start, validation, checkpoints, evaluate_run and the second pass). The default plan is 5 seeds x
(stage 1 + 9 main and cap variants) + 3 ablation seeds x 7 more rows = 71 runs, about 4 h. Split
it by --seeds / --variants: a rerun resumes.
"""
from __future__ import annotations

import argparse
import copy
import hashlib
import io
import json
import os
import re
import sys
import time
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence

import numpy as np
from etils import epath

ROOT = epath.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

REFERENCE = 'mixoe_mixup'  # paired differences of the main table are taken to this method
LMOE_REFERENCE = 'lmoe'  # and of the ablation to the reconstructed preset
#: records of this script; those without 'path' in their protocol came from the standalone loop
#: it had before (its own state, step, loop and evaluation), kept apart in the tables
PATH = 'trainer'

#: The LMoE reconstruction the study was run with (the `lmoe` preset until the study chose
#: consistency 0.1): pinned here so that the study's names keep their meaning whatever the preset.
RECONSTRUCTED = {'logit_mix': 5.0, 'consistency': 1.0, 'consistency_kind': 'mse', 'input_mix': 0.0,
                 'mix': 'mixup', 'alpha': 1.0, 'lam_per_example': False, 'stop_gradient': 'none'}


def _lmoe(**change):
    return ('lmoe', {**RECONSTRUCTED, **change})


# name -> (preset, overrides). Main comparison first; the ablation changes one thing of 'lmoe',
# the reconstruction above (logit_mix 5, consistency 1 MSE, input_mix 0, mixup, alpha 1, one lam
# per step, no stop-gradient).
MAIN = {
    'baseline': ('baseline', {}),
    'oe': ('oe', {}),
    'energy_oe': ('energy_oe', {}),
    'mixoe_mixup': ('mixoe_mixup', {}),
    'mixoe_cutmix': ('mixoe_cutmix', {}),
    'lmoe': _lmoe(),
}
#: The chosen preset's settings (`lmoe`: the reconstruction with consistency 0.1), pinned too.
CHOSEN = {**RECONSTRUCTED, 'consistency': 0.1}
#: Issue 21's variants that keep LMoE's terms and address the margin cap its logit mixture puts on
#: the clean ID margin (docs/comparison.md, "The margin cap"): the library's presets of the same
#: name, pinned like the others; main variants, so they run on every seed.
CAP = {
    'logit_mixoe': ('logit_mixoe', {**CHOSEN, 'input_mix': 5.0}),
    'lmoe_sg': ('lmoe_sg', {**CHOSEN, 'logit_mix_stop_id': True}),
    'logit_mixoe_sg': ('logit_mixoe_sg', {**CHOSEN, 'input_mix': 5.0, 'logit_mix_stop_id': True}),
}
ABLATION = {  # issue 13's ablation: each line changes one thing of 'lmoe'
    'lmoe:logit_mix_only': _lmoe(consistency=0.0),
    'lmoe:consistency_only': _lmoe(logit_mix=0.0),
    'lmoe:kl': _lmoe(consistency_kind='kl'),
    'lmoe:consistency0.1': _lmoe(consistency=0.1),
    'lmoe:consistency3': _lmoe(consistency=3.0),
    'lmoe:logit_mix1': _lmoe(logit_mix=1.0),
    'lmoe:+input_mix5': _lmoe(input_mix=5.0),
}
EXTRA = {  # further variants, run only when named in --variants
    'mixoe+consistency1': _lmoe(logit_mix=0.0, input_mix=5.0),
    'lmoe:consistency10': _lmoe(consistency=10.0),
    'lmoe:lam_per_example': _lmoe(lam_per_example=True),
    'lmoe:sg_mixed_input': _lmoe(stop_gradient='mixed_input'),
    'lmoe:sg_logit_mixture': _lmoe(stop_gradient='logit_mixture'),
}
VARIANTS = {**MAIN, **CAP, **ABLATION, **EXTRA}
#: the reconstructed LMoE variants clean validation chooses among (the preset and its ablation)
LMOE_CANDIDATES = (LMOE_REFERENCE, 'lmoe:kl', 'lmoe:consistency0.1', 'lmoe:consistency3',
                   'lmoe:logit_mix1', 'lmoe:+input_mix5')
#: a candidate may not lose more ID validation accuracy than this (points) to the baseline control
SELECTION_MAX_ACC_DROP = 1.0
SCORES = ('msp', 'energy')
SMOKE_VARIANTS = 'baseline,mixoe_mixup,lmoe'


# --------------------------------------------------------------------------------------------------
# Set-up: the demo config and its class split, the eval sets held in memory
# --------------------------------------------------------------------------------------------------

def parse_classes(text: str) -> List[int]:
    return sorted(int(c) for c in text.split(',') if c.strip())


def demo_config(data_dir: str, *, id_classes: Optional[Sequence[int]] = None,
                split: Optional[int] = None, outlier_val_fraction: float = 0.1,
                data_overrides: Sequence[str] = (), leave_out: Sequence[int] = ()):
    """The demo config with a class split (explicit ID classes, or MixOE split ``split`` of
    the config's 6 of 10; neither: the config's own {0, 1, 2, 3, 8, 9}), the share of the
    outliers held out for validation and ``KEY=VALUE`` overrides of ``config.data`` (the value
    parsed as the field's type; a tuple field takes a comma list).

    ``leave_out`` (ID classes of that split): a leave-classes-out selection run. Those classes
    become its fine-grained OOD and the split's own OOD classes (the test's) are ignored: no image
    of them is read, so nothing chosen on such a run has seen the test's OOD classes."""
    from configs import fashion_mnist
    cfg = fashion_mnist.get_config()
    cfg.data.data_dir = str(data_dir)
    for item in data_overrides:
        key, sep, value = item.partition('=')
        if not sep or key not in cfg.data:
            raise SystemExit(f'--data {item!r}: expected KEY=VALUE with KEY in config.data')
        current = cfg.data[key]
        if isinstance(current, tuple):
            cfg.data[key] = tuple(v for v in value.split(',') if v)
        elif isinstance(current, bool):
            cfg.data[key] = value.lower() in ('1', 'true', 'yes')
        elif isinstance(current, (int, float)):
            cfg.data[key] = type(current)(value)
        else:
            cfg.data[key] = value
    if id_classes and split is not None:
        raise SystemExit('give --id_classes or --split, not both')
    if id_classes:
        cfg.data.id_classes = tuple(id_classes)
        cfg.data.num_id_classes = len(id_classes)
    elif split is not None:
        cfg.data.id_classes = None
        cfg.data.split = int(split)
    if leave_out:
        from lmoe_jax import data
        split_ = data.class_split(cfg.data.num_classes, cfg.data.num_id_classes, cfg.data.split,
                                  cfg.data.id_classes)
        stray = sorted(set(leave_out) - set(split_.id_classes))
        if stray:
            raise SystemExit(f'--leave_out {stray}: not ID classes of {list(split_.id_classes)}')
        kept = tuple(c for c in split_.id_classes if c not in set(leave_out))
        if len(kept) < 2:
            raise SystemExit('--leave_out must leave at least 2 ID classes')
        cfg.data.id_classes, cfg.data.num_id_classes = kept, len(kept)
        cfg.data.ignore_classes = tuple(split_.ood_classes)
    cfg.data.outlier_val_fraction = float(outlier_val_fraction)
    return cfg


def load_eval_arrays(cfg, fine_diag_size: int, batch_size: int = 1000) -> Dict[str, Dict[str, np.ndarray]]:
    """Every validation, test and diagnostic set once, as host arrays {name: {'image', 'label',
    'kind'}}, read by the data module's own eval sets (the ones ``evaluate_run`` reads).

    The fine-grained diagnostic (all training images of the held-out classes) is cut to a fixed
    random ``fine_diag_size`` subset (seed 0) to keep evaluation cheap.
    """
    from lmoe_jax import data
    kw = dict(batch_size=batch_size, process_index=0, process_count=1)
    sets = data.validation_datasets(cfg.data, **kw)
    if {s.name for s in sets} != {'id_val', 'outlier_val'}:
        raise SystemExit(f'selection needs id_val and outlier_val, got {[s.name for s in sets]}: '
                         'set config.data.val_fraction and --outlier_val_fraction above 0.')
    sets += [data.fine_ood_diagnostic_dataset(cfg.data, **kw)] + data.eval_datasets(cfg.data, **kw)
    arrays = {}
    for s in sets:
        images, labels = [], []
        for batch in s.batches():
            keep = batch['mask'].astype(bool)
            images.append(batch['image'][keep])
            labels.append(batch['label'][keep])
        arrays[s.name] = {'image': np.concatenate(images), 'label': np.concatenate(labels),
                          'kind': s.kind}
    diag = arrays['fine_ood_diag']
    if 0 < fine_diag_size < len(diag['label']):
        pick = np.sort(np.random.default_rng(0).choice(len(diag['label']), fine_diag_size,
                                                       replace=False))
        arrays['fine_ood_diag'] = {k: (v[pick] if k != 'kind' else v) for k, v in diag.items()}
    return arrays


# --------------------------------------------------------------------------------------------------
# The configs of one seed: stage 1 and each variant's stage 2 (plain trainer configs)
# --------------------------------------------------------------------------------------------------

def seed_config(cfg, seed: int, *, baseline_steps: Optional[int] = None,
                finetune_steps: Optional[int] = None, finetune_lr: Optional[float] = None,
                steps_per_epoch: Optional[int] = None, log_every: Optional[int] = None,
                eval_batch_size: Optional[int] = None, cache_dir: Optional[str] = None):
    """The demo config for seed ``seed`` as ``main.py`` would take it with ``--config.*`` flags:
    ``baseline_steps`` becomes ``baseline_epochs`` = steps / steps per epoch (the trainer turns
    it back into the same count), ``finetune_steps`` ``num_train_steps``, ``finetune_lr``
    ``learning_rate`` (stage 2; stage 1 keeps the config's through ``baseline_learning_rate``)."""
    c = copy.deepcopy(cfg)
    with c.unlocked():
        c.seed = int(seed)
        c.scores = SCORES
        if baseline_steps is not None:
            c.baseline_epochs = float(baseline_steps) / float(steps_per_epoch)
        if finetune_steps is not None:
            c.num_train_steps = int(finetune_steps)
        if finetune_lr is not None and float(finetune_lr) != float(cfg.learning_rate):
            c.baseline_learning_rate = float(cfg.baseline_learning_rate or cfg.learning_rate)
            c.learning_rate = float(finetune_lr)
        if log_every:
            c.log_every_steps = int(log_every)
        if eval_batch_size:
            c.eval_batch_size = int(eval_batch_size)
        if cache_dir is not None:
            c.compilation_cache_dir = str(cache_dir)
    return c


def variant_config(config, name: str, baseline_dir):
    """Stage 2 of ``name``: its preset and loss overrides (every other loss field back to the
    preset's), started from the seed's stage-1 run, as ``trainer._run_stages`` hands over."""
    preset, overrides = VARIANTS[name]
    c = copy.deepcopy(config)
    with c.unlocked():
        c.method = preset
        for key in c.loss.keys():
            c.loss[key] = None
        for key, value in overrides.items():
            c.loss[key] = value
        c.init_from = str(baseline_dir)
    return c


#: fields that do not change what a stage trains (the log interval, the eval batch, where
#: compiled programs are kept, the scores of the report; stage 1 has applied its learning rate)
_NOT_HASHED = ('log_every_steps', 'eval_batch_size', 'compilation_cache_dir', 'scores', 'profile',
               'baseline_learning_rate')


def config_hash(config) -> str:
    """Short hash of a stage's config: the name of its cached run."""
    from lmoe_jax import trainer
    fields = {k: v for k, v in trainer.config_to_dict(config).items() if k not in _NOT_HASHED}
    if fields['data'].get('ignore_classes') is None:  # a field added after the first trainer runs
        fields['data'].pop('ignore_classes', None)
    fields['data'].pop('autotune', None)  # tf.data performance only: the same batches either way
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:10]


def seed_dir(workdir: epath.PathLike, config) -> epath.Path:
    """The seed's cache folder, named by a hash of everything its stage-1 run depends on."""
    from lmoe_jax import trainer
    stage1 = trainer.baseline_stage_config(config)
    return epath.Path(workdir) / f'seed{int(config.seed)}_{config_hash(stage1)}'


def variant_dir(seeds_dir: epath.Path, name: str, config) -> epath.Path:
    return seeds_dir / f"{re.sub(r'[^A-Za-z0-9._-]', '_', name)}_{config_hash(config)}"


# --------------------------------------------------------------------------------------------------
# Training: trainer.train_stage, stage 1 once per seed
# --------------------------------------------------------------------------------------------------

def train_baseline(config, seeds_dir: epath.Path) -> tuple[Any, epath.Path, Optional[float]]:
    """Stage 1 of the seed (``trainer.train_stage`` of ``baseline_stage_config``), trained once:
    a finished run in its folder is reused as it is. Returns (config, workdir, seconds trained
    by this call or None)."""
    from lmoe_jax import trainer
    stage1 = trainer.baseline_stage_config(config)
    workdir = seeds_dir / 'baseline'
    return (stage1, workdir) + (_train(stage1, workdir, 'baseline'),)


def stage1_fingerprint(baseline_dir: epath.PathLike) -> str:
    """sha256 of the stage-1 checkpoint every variant starts from (its best step and the bytes,
    dtype, shape and tree path of each variable). Recorded with every run of the seed, so a
    resumed study can tell whether a re-trained stage 1 is the one its records started from."""
    import jax

    from lmoe_jax import checkpoint
    with checkpoint.reading(checkpoint.as_path(baseline_dir)) as mngr:
        step = checkpoint.best_step(mngr)
        variables = checkpoint.read_variables(mngr, step)
    digest = hashlib.sha256(f'step {int(step)}'.encode())
    for path, leaf in jax.tree_util.tree_flatten_with_path(variables)[0]:
        array = np.ascontiguousarray(np.asarray(leaf))
        digest.update(f'{jax.tree_util.keystr(path)} {array.dtype} {array.shape}'.encode())
        digest.update(array.tobytes())
    return digest.hexdigest()


def check_same_stage1(records: Iterable[Mapping[str, Any]], seed: int, fingerprint: str) -> int:
    """Stops the study if a recorded run of ``seed`` started from another stage-1 checkpoint
    than ``fingerprint``: its pairing with the runs still to do would be broken. That happens
    when the stage-1 cache is gone and stage 1 is trained again on another CPU (float sums in
    another order: another checkpoint). Returns how many records of the seed carry no
    fingerprint (written before it was recorded: not checkable)."""
    of_seed = [r for r in records if int(r['seed']) == int(seed)]
    other = sorted({r['stage1_sha256'] for r in of_seed if r.get('stage1_sha256')} - {fingerprint})
    if other:
        raise SystemExit(
            f'seed {seed}: the stage-1 checkpoint now in the cache ({fingerprint[:12]}) is not the '
            f'one this study\'s recorded runs of the seed started from ({other[0][:12]}): '
            'pairing them with new runs would compare fine-tunes of different baselines. This '
            'happens when the stage-1 cache was lost and stage 1 trained again on another '
            'machine or CPU. Restore the --workdir cache, or run the whole class set again '
            'into another --out.')
    return sum(1 for r in of_seed if not r.get('stage1_sha256'))


def train_variant(config, name: str, seeds_dir: epath.Path,
                  baseline_dir: epath.Path) -> tuple[Any, epath.Path, Optional[float]]:
    """Stage 2 of ``name`` from the seed's stage-1 run; (config, workdir, seconds or None)."""
    stage2 = variant_config(config, name, baseline_dir)
    workdir = variant_dir(seeds_dir, name, stage2)
    return stage2, workdir, _train(stage2, workdir, name)


def _train(config, workdir: epath.Path, stage: str) -> Optional[float]:
    from lmoe_jax import trainer
    trainer.validate_config(config, mode='train')
    start = time.perf_counter()
    summary = trainer.train_stage(config, workdir, stage=stage)
    if summary.get('preempted'):
        raise SystemExit(f'{stage}: stopped on request; run the same command again to resume.')
    expected = trainer.make_setup(config).total_steps
    if int(summary['steps']) != expected:
        raise RuntimeError(f'{stage}: {summary["steps"]} steps in {workdir}, expected {expected}')
    # 'val_accuracy' only comes back from a loop that ran: a finished run is reused as it is
    return time.perf_counter() - start if 'val_accuracy' in summary else None


def logged_train_means(workdir: epath.PathLike, window: int = 50) -> tuple[Dict[str, float], int]:
    """The trainer's logged means of the train metrics ('train/*' scalars of its TensorBoard
    files) over the last logged intervals that cover at least ``window`` steps, weighted by
    interval length; returns (means without the 'train/' prefix, steps covered)."""
    import tensorflow as tf
    by_step: Dict[int, Dict[str, float]] = {}
    for path in sorted(epath.Path(workdir).glob('events.out.tfevents.*')):
        for event in tf.compat.v1.train.summary_iterator(str(path)):
            for value in event.summary.value:
                if value.tag.startswith('train/'):
                    number = (float(tf.make_ndarray(value.tensor)) if value.HasField('tensor')
                              else float(value.simple_value))
                    by_step.setdefault(int(event.step), {})[value.tag[len('train/'):]] = number
    steps = sorted(by_step)
    blocks = []  # (length, metrics) from the end
    for i in range(len(steps) - 1, -1, -1):
        length = steps[i] - (steps[i - 1] if i else 0)
        blocks.append((length, by_step[steps[i]]))
        if sum(b[0] for b in blocks) >= window:
            break
    if not blocks:
        return {}, 0
    total = sum(b[0] for b in blocks)
    keys = set.intersection(*[set(m) for _, m in blocks])
    return {k: float(sum(n * m[k] for n, m in blocks) / total) for k in sorted(keys)}, int(total)


# --------------------------------------------------------------------------------------------------
# Evaluation: trainer.evaluate_run, and evaluate's steps on the study's own sets
# --------------------------------------------------------------------------------------------------

def model_outputs(config, workdir, arrays: Mapping[str, Mapping[str, Any]]):
    """{set: {'logits', 'label'}} of the checkpoint evaluate_run scores
    (``trainer.restore_for_evaluation``) on every array set, through ``evaluate.make_forward`` /
    ``model_outputs`` with evaluate_run's batch (``trainer.eval_batch_size``) and sharding."""
    from lmoe_jax import evaluate, parallel, trainer
    from lmoe_jax.ood import sources
    setup, state, step = trainer.restore_for_evaluation(config, workdir)
    sharding = parallel.data_sharded(setup.mesh)
    forward = evaluate.make_forward(setup.model.apply, features=False, sharding=sharding)
    batch = trainer.eval_batch_size(config)
    out = {}
    for name, a in arrays.items():
        source = sources.array_source(a['image'], a['label'], batch)
        out[name] = evaluate.concat_outputs(evaluate.model_outputs(
            forward, state.variables, source, sharding=sharding, what=f'study[{name}]'), name)
    return out, int(step)


def metric_groups(arrays: Mapping[str, Mapping[str, Any]]) -> Dict[str, tuple]:
    """group -> (ID set, [OOD sets]). 'val' is the only group that may choose anything;
    'fine_diag' uses the held-out classes' training images and is reported apart; 'test' is
    evaluate_run's (recomputed here to check the per-image arrays against its report)."""
    return {'val': ('id_val', ['outlier_val']),
            'fine_diag': ('id_val', ['fine_ood_diag']),
            'test': ('id_test', ['fine_ood_test'] + [n for n, a in arrays.items()
                                                     if a['kind'] == 'coarse_ood'])}


#: evaluate's mean rows -> the record's OOD kind ('ood_mean' is the held-out outliers)
_KIND_OF_ROW = {'fine_mean': 'fine', 'coarse_mean': 'coarse', 'ood_mean': 'outlier'}


def flat_metrics(metrics: Mapping[str, Any], id_accuracy: float) -> Dict[str, float]:
    """evaluate's metrics dict -> the record's {'id_acc', '<score>/<kind>_auroc', ..._fpr95}."""
    res = {'id_acc': float(id_accuracy)}
    for score in SCORES:
        for row, kind in _KIND_OF_ROW.items():
            if row in metrics['scores'][score]:
                values = metrics['scores'][score][row]
                res[f'{score}/{kind}_auroc'] = float(values['openood_auroc'])
                res[f'{score}/{kind}_fpr95'] = float(values['openood_fpr95'])
    return res


def evaluate_variant(config, workdir, arrays: Mapping[str, Mapping[str, Any]]
                     ) -> tuple[dict, Dict[str, np.ndarray]]:
    """(record fields, per-image arrays) of a finished run.

    'test' is ``trainer.evaluate_run``'s report (written into ``workdir``); 'val' and
    'fine_diag' come from ``evaluate.build_metrics`` on the same checkpoint's outputs, whose
    test metrics must equal the report's. Per-image: '<set>/logits', '<set>/<score>' and
    '<set>/label' of every set; 'diag': a few logit statistics of the test sets.
    """
    from lmoe_jax import evaluate, trainer
    from lmoe_jax.ood import metrics as metrics_lib
    product = trainer.evaluate_run(config, workdir)
    outputs, step = model_outputs(config, workdir, arrays)
    scores = {n: evaluate.score_outputs(o, {}, SCORES, evaluate.ScoreConfig())
              for n, o in outputs.items()}
    out = {}
    for group, (id_name, ood_names) in metric_groups(arrays).items():
        kinds = {id_name: 'id', **{n: arrays[n]['kind'] for n in ood_names}}
        metrics = evaluate.build_metrics({n: scores[n] for n in kinds}, kinds, id_name, None,
                                         seed=int(config.seed))
        acc = metrics_lib.top1_accuracy(outputs[id_name]['logits'], outputs[id_name]['label'])
        out[group] = flat_metrics(metrics, acc)
    test = flat_metrics(product, product['id_accuracy'])
    gap = (max(abs(test[k] - out['test'][k]) for k in test) if set(test) == set(out['test'])
           else float('inf'))
    if gap > 1e-9:
        raise RuntimeError(f'{workdir}: the study\'s pass over the test sets gives {out["test"]}, '
                           f'evaluate_run {test} (max gap {gap:.3g}): not the same checkpoint?')
    out['test'] = test
    diag = {}
    for name in ('id_test', 'fine_ood_test'):
        z = outputs[name]['logits'].astype(np.float64)
        top2 = np.sort(z, axis=-1)[:, -2:]
        # msp is the log-odds of the max softmax probability; the mean is of the probability
        diag[name] = {'mean_msp': float((1.0 / (1.0 + np.exp(-scores[name]['msp']))).mean()),
                      'mean_energy': float(scores[name]['energy'].mean()),
                      'mean_top1_margin': float(np.mean(top2[:, 1] - top2[:, 0])),
                      'mean_logit_std': float(np.mean(np.std(z, axis=-1)))}
    out['diag'] = diag
    out['eval_step'] = step
    per_image = {}
    for name in arrays:
        per_image[f'{name}/label'] = np.asarray(arrays[name]['label'])
        per_image[f'{name}/logits'] = outputs[name]['logits'].astype(np.float32)
        per_image.update({f'{name}/{score}': scores[name][score] for score in SCORES})
    return out, per_image


# --------------------------------------------------------------------------------------------------
# Results file
# --------------------------------------------------------------------------------------------------

def _atomic_write(path: epath.Path, data) -> None:
    from lmoe_jax.ood import report
    report._atomic_write(path, data)  # noqa: SLF001  the report's writer (gs:// safe)


def _npz_bytes(arrays: Mapping[str, np.ndarray]) -> bytes:
    buffer = io.BytesIO()
    np.savez_compressed(buffer, **arrays)
    return buffer.getvalue()


def normalized(protocol: Mapping[str, Any]) -> Dict[str, Any]:
    """Records written before --finetune_lr existed fine-tuned at the stage-1 learning rate;
    those without 'path' came from the standalone loop."""
    return {'finetune_lr': protocol['learning_rate'], 'path': 'standalone', **protocol}


def read_results(path: epath.PathLike) -> List[dict]:
    path = epath.Path(path)
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def study_records(folder: epath.PathLike, path: str = PATH) -> List[dict]:
    """The records of ``folder``/results.jsonl that ran on ``path`` (``PATH``: this script on the
    trainer; 'standalone': the loop it had before), for the scripts that read a study's records."""
    return [r for r in read_results(epath.Path(folder) / 'results.jsonl')
            if normalized(r['protocol'])['path'] == path]


def append_result(path: epath.PathLike, record: Mapping[str, Any]) -> None:
    """Add one line by rewriting the (small) file atomically: works on gs:// too."""
    path = epath.Path(path)
    text = path.read_text() if path.exists() else ''
    _atomic_write(path, text + json.dumps(record, sort_keys=True) + '\n')


def scores_name(seed: int, variant: str) -> str:
    """File of a run's per-image arrays, beside results.jsonl (variant names hold ':' and '+')."""
    return f"scores_seed{seed}_{re.sub(r'[^A-Za-z0-9._-]', '_', variant)}.npz"


def _relative(path) -> str:
    """A workdir for the record: relative to the repository when inside it."""
    text, root = str(path), str(ROOT)
    return os.path.relpath(text, root) if text.startswith(root + os.sep) else text


def select_lmoe(records: Sequence[dict], seeds: Sequence[int]) -> Optional[dict]:
    """Clean selection among ``LMOE_CANDIDATES``, reading validation only (ID val + held-out
    outliers, MSP; nothing from the test sets or the held-out test-OOD classes).

    The leader is the candidate with the highest mean outlier-val AUROC over ``seeds`` among
    those whose mean ID val accuracy is at most ``SELECTION_MAX_ACC_DROP`` points below the
    baseline control's. It replaces the incumbent preset ``lmoe`` only if its paired difference
    to it is resolved: the 95% Student-t interval over the seeds lies above 0. Otherwise the
    incumbent stays (a difference inside the seed noise is no reason to change a preset).

    Returns None until every candidate and the control have every seed, else {'variant' (the
    choice), 'leader', 'leader_vs_lmoe' (paired stats, x100), 'auroc', 'id_acc' (means, x100),
    'eligible', 'seeds'}.
    """
    def per_seed(variant, key):
        return {r['seed']: 100.0 * r['val'][key] for r in records
                if r['variant'] == variant and r['seed'] in seeds}
    auroc_seeds = {n: per_seed(n, 'msp/outlier_auroc') for n in LMOE_CANDIDATES}
    acc_seeds = {n: per_seed(n, 'id_acc') for n in LMOE_CANDIDATES + ('baseline',)}
    if any(set(v) != set(seeds) for v in list(auroc_seeds.values()) + list(acc_seeds.values())):
        return None
    auroc = {n: float(np.mean(list(v.values()))) for n, v in auroc_seeds.items()}
    acc = {n: float(np.mean(list(v.values()))) for n, v in acc_seeds.items()}
    eligible = [n for n in LMOE_CANDIDATES if acc[n] >= acc['baseline'] - SELECTION_MAX_ACC_DROP]
    if not eligible:
        return None
    leader = max(eligible, key=lambda n: auroc[n])
    versus = paired_stats(auroc_seeds[leader], auroc_seeds[LMOE_REFERENCE], True)
    resolved = leader != LMOE_REFERENCE and len(seeds) > 1 and versus['lo'] > 0
    return {'variant': leader if resolved or LMOE_REFERENCE not in eligible else LMOE_REFERENCE,
            'leader': leader, 'leader_vs_lmoe': versus, 'auroc': auroc, 'id_acc': acc,
            'eligible': eligible, 'seeds': list(seeds)}


def plan(names: Sequence[str], seeds: Sequence[int], ablation_seeds: Sequence[int]) -> List[tuple]:
    """(seed, variant) pairs in run order. Phase 1: every variant on the ablation seeds (they
    choose the lmoe candidate); phase 2: the main variants on the other seeds. Variant-major
    inside a phase, so an interrupted study still has every seed of its earlier variants."""
    main = ['stage1'] + [n for n in names if n not in ABLATION and n not in EXTRA]
    phase1 = [(s, n) for n in ['stage1'] + list(names) for s in ablation_seeds]
    phase2 = [(s, n) for n in main for s in seeds if s not in ablation_seeds]
    return phase1 + phase2


def epoch_steps(cfg) -> int:
    """Train steps per epoch, as ``trainer.make_setup`` counts them (one process)."""
    from lmoe_jax import data
    info = data.dataset_info(cfg.data, process_count=1)
    return max(info.steps_per_epoch(int(cfg.batch_size)), 1)


def study_protocol(cfg, args) -> tuple[Dict[str, Any], int]:
    """The protocol every record carries (a rerun skips the records of the same protocol), and
    the steps per epoch, counted as ``trainer.make_setup`` counts them."""
    from lmoe_jax import data
    split = data.class_split(cfg.data.num_classes, cfg.data.num_id_classes, cfg.data.split,
                             cfg.data.id_classes, cfg.data.get('ignore_classes'))
    steps_per_epoch = epoch_steps(cfg)
    baseline_steps = args.baseline_steps or max(
        int(round(float(cfg.baseline_epochs) * steps_per_epoch)), 1)
    finetune_steps = args.finetune_steps or max(int(round(float(cfg.num_epochs) * steps_per_epoch)), 1)
    protocol = {'baseline_steps': baseline_steps, 'finetune_steps': finetune_steps,
                'batch_size': int(cfg.batch_size), 'learning_rate': float(cfg.learning_rate),
                'model': f'{cfg.model.name}-w{cfg.model.width}',
                'finetune_lr': float(args.finetune_lr or cfg.learning_rate),
                'id_classes': list(split.id_classes),
                'outlier_val_fraction': float(cfg.data.outlier_val_fraction),
                'fine_diag_size': args.fine_diag_size, 'selection': 'id_val+outlier_val',
                'path': PATH}
    if split.ignored_classes:  # a leave-classes-out run: its OOD classes are held-out ID classes
        protocol.update(leave_out=list(split.ood_classes), ignored=list(split.ignored_classes))
    return protocol, steps_per_epoch


def run(args) -> None:
    from lmoe_jax import checkpoint, trainer
    cfg = demo_config(args.data_dir, id_classes=parse_classes(args.id_classes or ''),
                      split=args.split, outlier_val_fraction=args.outlier_val_fraction,
                      data_overrides=args.data, leave_out=parse_classes(args.leave_out))
    trainer.prepare_datasets(cfg.data)
    protocol, steps_per_epoch = study_protocol(cfg, args)
    workdir = epath.Path(args.workdir)

    def config_of(seed: int):
        return seed_config(cfg, seed, baseline_steps=args.baseline_steps,
                           finetune_steps=args.finetune_steps, finetune_lr=args.finetune_lr,
                           steps_per_epoch=steps_per_epoch, log_every=args.log_every,
                           eval_batch_size=args.eval_batch_size,
                           cache_dir=str(checkpoint.as_path(workdir) / 'jax_cache'))
    # resumed / split invocations do not recompile every variant
    trainer.enable_compilation_cache(config_of(0), str(workdir))
    names = ([n for n in args.variants.split(',') if n] if args.variants
             else list(MAIN) + list(CAP) + list(ABLATION))
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        raise SystemExit(f'unknown variant(s) {unknown}; choose from {list(VARIANTS)}')
    seeds = [int(s) for s in args.seeds.split(',')]
    ablation_seeds = [int(s) for s in args.ablation_seeds.split(',') if s] or seeds
    if not set(ablation_seeds) <= set(seeds):
        raise SystemExit(f'--ablation_seeds {ablation_seeds} must be among --seeds {seeds}')
    results = epath.Path(args.out) / 'results.jsonl'

    def current_records():
        return [r for r in read_results(results) if normalized(r['protocol']) == protocol]

    def pending():
        everything = read_results(results)
        records = [r for r in everything if normalized(r['protocol']) == protocol]
        done = {(r['seed'], r['variant']) for r in records}
        todo = [p for p in plan(names, seeds, ablation_seeds) if p not in done]
        chosen = select_lmoe(records, ablation_seeds)
        if chosen and chosen['variant'] != LMOE_REFERENCE:  # the chosen one joins the main table
            todo += [(s, chosen['variant']) for s in seeds if (s, chosen['variant']) not in done]
        taken = {r['scores_file'] for r in everything if normalized(r['protocol']) != protocol}
        clash = sorted(taken & {scores_name(s, n) for s, n in todo})
        if clash:
            raise SystemExit(f'{results.parent} holds runs of another protocol whose per-image '
                             f'files this one would overwrite ({clash[0]}, ...): use another --out.')
        return todo, len(done)

    todo, n_done = pending()
    print(f'protocol {protocol}\n{steps_per_epoch} steps per epoch; {len(todo)} runs to do, '
          f'{n_done} already in {results}', flush=True)
    if not todo:
        return
    t0 = time.perf_counter()
    arrays = load_eval_arrays(cfg, args.fine_diag_size)
    print('eval sets: ' + ', '.join(f"{k} {len(v['label'])}" for k, v in arrays.items())
          + f' ({time.perf_counter() - t0:.0f}s)', flush=True)
    stage1_runs: Dict[int, tuple] = {}
    fingerprints: Dict[int, str] = {}
    start_all = time.perf_counter()
    finished = 0
    while todo:
        seed, name = todo[0]
        config = config_of(seed)
        seeds_dir = seed_dir(workdir, config)
        if seed not in stage1_runs:
            stage1_runs[seed] = train_baseline(config, seeds_dir)
            fingerprints[seed] = stage1_fingerprint(stage1_runs[seed][1])
            unchecked = check_same_stage1(current_records(), seed, fingerprints[seed])
            if unchecked:
                print(f'seed {seed}: {unchecked} earlier record(s) carry no stage-1 fingerprint; '
                      'that they started from this checkpoint is not checked', flush=True)
        stage1, base_dir, base_seconds = stage1_runs[seed]
        t_run = time.perf_counter()
        record = {'seed': seed, 'variant': name, 'protocol': protocol,
                  'stage1_sha256': fingerprints[seed]}
        if name == 'stage1':  # the stage-1 checkpoint every variant starts from
            # train_seconds: the baseline's training when this process trained it (else None)
            run_config, run_dir = stage1, base_dir
            record.update(preset=None, overrides={}, train_seconds=base_seconds, train_metrics={})
        else:
            preset, overrides = VARIANTS[name]
            run_config, run_dir, seconds = train_variant(config, name, seeds_dir, base_dir)
            means, covered = logged_train_means(run_dir)
            with checkpoint.reading(checkpoint.as_path(base_dir)) as mngr:
                init_step = checkpoint.best_step(mngr)
            record.update(preset=preset, overrides=overrides, train_seconds=seconds,
                          train_metrics=means, train_metrics_steps=covered,
                          init_from_step=int(init_step))
        metrics, per_image = evaluate_variant(run_config, run_dir, arrays)
        record.update(metrics, scores_file=scores_name(seed, name), workdir=_relative(run_dir))
        _atomic_write(results.parent / record['scores_file'], _npz_bytes(per_image))
        record['seconds'] = time.perf_counter() - t_run
        record['load_average'] = os.getloadavg()[0]
        append_result(results, record)  # after its scores file: a listed run has its scores
        finished += 1
        todo, _ = pending()
        elapsed = time.perf_counter() - start_all
        print(f"[{finished}/{finished + len(todo)}] seed {seed} {name}: "
              f"val outlier AUROC {100 * record['val']['msp/outlier_auroc']:.2f}, "
              f"test fine AUROC {100 * record['test']['msp/fine_auroc']:.2f}, "
              f"test acc {100 * record['test']['id_acc']:.2f}, step {record['eval_step']} "
              f"({record['seconds']:.0f}s, load {record['load_average']:.2f}; "
              f"{elapsed / 60:.1f} min so far, ~{elapsed / finished * len(todo) / 60:.0f} min left)",
              flush=True)


# --------------------------------------------------------------------------------------------------
# Tables
# --------------------------------------------------------------------------------------------------

def paired_stats(values: Mapping[int, float], reference: Mapping[int, float],
                 higher_is_better: bool) -> Dict[str, float]:
    """``value - reference`` over the seeds both have: mean, sample std, the 95% Student-t
    interval of the mean difference (lo, hi), and the seeds won."""
    from scipy import stats
    seeds = sorted(set(values) & set(reference))
    diffs = np.array([values[s] - reference[s] for s in seeds], np.float64)
    nan = float('nan')
    if not len(diffs):
        return {'mean': nan, 'std': nan, 'lo': nan, 'hi': nan, 'wins': 0, 'n': 0}
    wins = int(np.sum(diffs > 0) if higher_is_better else np.sum(diffs < 0))
    mean = float(np.mean(diffs))
    if len(diffs) > 1:
        std = float(np.std(diffs, ddof=1))
        half = float(stats.t.ppf(0.975, len(diffs) - 1)) * std / np.sqrt(len(diffs))
    else:
        std = half = nan
    return {'mean': mean, 'std': std, 'lo': mean - half, 'hi': mean + half, 'wins': wins,
            'n': len(diffs)}


def by_variant(records: Sequence[dict], split: str, key: str) -> Dict[str, Dict[int, float]]:
    """{variant: {seed: 100 * record[split][key]}} of the records that have that value."""
    table: Dict[str, Dict[int, float]] = {}
    for r in records:
        if key in r.get(split, {}):
            table.setdefault(r['variant'], {})[r['seed']] = 100.0 * r[split][key]
    return table


def _mean_std(values: Mapping[int, float]) -> str:
    v = np.array(list(values.values()), np.float64)
    if not len(v):
        return '-'
    return f'{v.mean():.2f} ± {v.std(ddof=1):.2f}' if len(v) > 1 else f'{v.mean():.2f}'


def _diff_cell(stats: Mapping[str, float]) -> str:
    if not stats['n']:
        return '-'
    if stats['n'] < 2:
        return f"{stats['mean']:+.2f} ({stats['wins']}/{stats['n']})"
    return (f"{stats['mean']:+.2f} [{stats['lo']:+.2f}, {stats['hi']:+.2f}] "
            f"({stats['wins']}/{stats['n']})")


def metric_table(records, names, split, columns, reference, title) -> str:
    """Mean ± std over seeds of each column, plus paired differences to ``reference`` of the
    second and third columns (an AUROC and its FPR@95)."""
    (auroc_key, auroc_name), (fpr_key, fpr_name) = columns[1], columns[2]
    lines = [f'**{title}**', '',
             '| variant | seeds | ' + ' | '.join(c[1] for c in columns)
             + f' | Δ {auroc_name} vs {reference} (wins) | Δ {fpr_name} vs {reference} (wins) |',
             '|' + ' --- |' * (len(columns) + 4)]
    data = {key: by_variant(records, split, key) for key, _ in columns}
    auroc, fpr = by_variant(records, split, auroc_key), by_variant(records, split, fpr_key)
    for name in names:
        n = len(data[columns[0][0]].get(name, {}))
        if not n:
            continue
        cells = [_mean_std(data[key].get(name, {})) for key, _ in columns]
        d_auc = paired_stats(auroc.get(name, {}), auroc.get(reference, {}), True)
        d_fpr = paired_stats(fpr.get(name, {}), fpr.get(reference, {}), False)
        lines.append(f'| {name} | {n} | ' + ' | '.join(cells)
                     + f' | {_diff_cell(d_auc)} | {_diff_cell(d_fpr)} |')
    return '\n'.join(lines)


def summarize(records: Sequence[dict]) -> str:
    if not records:
        return 'no results yet'
    protocols = []
    for r in records:
        if normalized(r['protocol']) not in protocols:
            protocols.append(normalized(r['protocol']))
    sections = []
    for protocol in protocols:
        subset = [r for r in records if normalized(r['protocol']) == protocol]
        how = ('trainer.train_stage / evaluate_run' if protocol['path'] == PATH
               else 'the standalone loop this script had before')
        sections.append(f"## Fine-tune lr {protocol['finetune_lr']:g}, {protocol['baseline_steps']} "
                        f"baseline + {protocol['finetune_steps']} fine-tune steps ({how})\n\n"
                        + summarize_protocol(subset, protocol))
    return '\n\n'.join(sections)


def seeds_with(records: Sequence[dict], names: Iterable[str]) -> List[int]:
    """The seeds that have a record of every variant in ``names``."""
    have: Dict[str, set] = {}
    for r in records:
        have.setdefault(r['variant'], set()).add(r['seed'])
    sets = [have.get(n, set()) for n in names]
    return sorted(set.intersection(*sets)) if sets else []


def selection_table(records: Sequence[dict]) -> tuple[str, Optional[dict]]:
    """The clean selection among ``LMOE_CANDIDATES`` (validation only) as markdown, and
    ``select_lmoe``'s result over the seeds every candidate has (None before that)."""
    seeds = seeds_with(records, LMOE_CANDIDATES + ('baseline',))
    chosen = select_lmoe(records, seeds) if seeds else None
    if not chosen:
        return '**Selection of the lmoe candidate**: not every candidate has run yet.', None
    lines = [f"**Selection of the lmoe candidate (validation only: ID val + held-out outliers, "
             f"MSP; seeds {','.join(map(str, seeds))})**", '',
             f"Rule (`select_lmoe`): the leader has the highest mean outlier-val AUROC among "
             f"candidates whose mean ID val accuracy is at most {SELECTION_MAX_ACC_DROP:g} point "
             f"below the baseline control's ({chosen['id_acc']['baseline']:.2f}); it replaces the "
             f"preset `lmoe` only if its paired difference to it has a 95% interval above 0. "
             f"Leader: `{chosen['leader']}`, vs lmoe {_diff_cell(chosen['leader_vs_lmoe'])}; "
             f"chosen: `{chosen['variant']}`.", '',
             '| candidate | outlier val AUROC | ID val acc | eligible | chosen |', '| --- | --- | --- | --- | --- |']
    for n in sorted(LMOE_CANDIDATES, key=lambda n: -chosen['auroc'][n]):
        lines.append(f"| {n} | {chosen['auroc'][n]:.2f} | {chosen['id_acc'][n]:.2f} | "
                     f"{'yes' if n in chosen['eligible'] else 'no'} | "
                     f"{'**chosen**' if n == chosen['variant'] else ''} |")
    return '\n'.join(lines), chosen


def cost_table(records: Sequence[dict]) -> str:
    """Wall time per (seed, variant): training alone, and with evaluation and saving the scores."""
    lines = ['| variant | runs | train s (mean) | run s (mean) | run s (total) | load (mean) '
             '| evaluated step (runs) |', '| --- | --- | --- | --- | --- | --- | --- |']
    names: List[str] = []
    for r in records:
        if r['variant'] not in names:
            names.append(r['variant'])
    total = 0.0
    for n in names:
        rs = [r for r in records if r['variant'] == n]
        train = [r['train_seconds'] for r in rs if r.get('train_seconds') is not None]
        # a stage1 record's 'seconds' is its evaluation; its baseline training is counted apart
        run_s = [r['seconds'] + ((r['train_seconds'] or 0.0) if n == 'stage1' else 0.0)
                 for r in rs]
        loads = [r['load_average'] for r in rs if 'load_average' in r]
        total += sum(run_s)
        steps = [r['eval_step'] for r in rs if 'eval_step' in r]
        evaluated = ', '.join(f'{s} ({steps.count(s)})' for s in sorted(set(steps))) or '-'
        lines.append(f"| {n} | {len(rs)} | {np.mean(train) if train else float('nan'):.0f} | "
                     f"{np.mean(run_s):.0f} | {sum(run_s):.0f} | "
                     f"{np.mean(loads) if loads else float('nan'):.2f} | {evaluated} |")
    title = (f'**Cost per (seed, variant)** (wall seconds; "stage1" = the shared baseline, trained '
             f'once per seed, plus its evaluation; run = training + evaluation of all sets + writing '
             f'the scores; train s of a run reused from the cache is not counted; evaluated step = '
             f'the checkpoint evaluated, the best by ID validation accuracy). '
             f'Total: {total / 60:.1f} min over {len(records)} runs.')
    return '\n'.join([title, ''] + lines)


def summarize_protocol(records: Sequence[dict], protocol: Mapping[str, Any]) -> str:
    selection, chosen = selection_table(records)
    picks = [chosen['variant'], chosen['leader']] if chosen else []
    extra = [n for n in dict.fromkeys(picks) if n not in MAIN]
    main = ['stage1'] + list(MAIN) + [n for n in CAP if any(r['variant'] == n for r in records)]
    main += [n for n in extra if n not in main]
    ablation = [LMOE_REFERENCE, REFERENCE] + list(ABLATION) + [n for n in EXTRA if any(
        r['variant'] == n for r in records)]
    out = [f'Protocol: `{json.dumps(protocol, sort_keys=True)}`. Values x100, mean ± sample std over '
           'seeds; Δ = paired difference (same seed, same baseline, same batches) as mean '
           '[95% Student-t interval] (seeds won / seeds). AUROC and FPR@95 follow OpenOOD (OOD '
           'positive). "stage1" is the baseline checkpoint before fine-tuning; "baseline" is its '
           'cross-entropy fine-tune (the control).', '', selection, '']
    for score in SCORES:
        cols = [('id_acc', 'ID acc'), (f'{score}/fine_auroc', 'fine AUROC'),
                (f'{score}/fine_fpr95', 'fine FPR95'), (f'{score}/coarse_auroc', 'coarse AUROC'),
                (f'{score}/coarse_fpr95', 'coarse FPR95')]
        out += [metric_table(records, main, 'test', cols, REFERENCE,
                             f'Main comparison, TEST sets, {score.upper()} score'), '']
    val_cols = [('id_acc', 'ID val acc'), ('msp/outlier_auroc', 'outlier val AUROC'),
                ('msp/outlier_fpr95', 'outlier val FPR95')]
    out += [metric_table(records, main, 'val', val_cols, REFERENCE,
                         'Main comparison, VALIDATION sets (ID val + held-out outliers), MSP score'), '']
    for ref in (LMOE_REFERENCE, REFERENCE):
        out += [metric_table(records, ablation, 'val', val_cols, ref,
                             f'LMoE ablation, VALIDATION sets (selection), MSP, Δ vs {ref}'), '']
    test_cols = [('id_acc', 'ID acc'), ('msp/fine_auroc', 'fine AUROC'),
                 ('msp/fine_fpr95', 'fine FPR95'), ('msp/coarse_auroc', 'coarse AUROC'),
                 ('msp/coarse_fpr95', 'coarse FPR95')]
    out += [metric_table(records, ablation, 'test', test_cols, LMOE_REFERENCE,
                         'LMoE ablation, TEST sets (reported, not used for selection), MSP, '
                         f'Δ vs {LMOE_REFERENCE}'), '']
    diag_cols = [('id_acc', 'ID val acc'), ('msp/fine_auroc', 'fine diag AUROC'),
                 ('msp/fine_fpr95', 'fine diag FPR95')]
    out += [metric_table(records, main + list(ABLATION), 'fine_diag', diag_cols, REFERENCE,
                         'DIAGNOSTIC, NOT FOR SELECTION: ID val vs training images of the held-out '
                         '(test OOD) classes, MSP'), '']
    out += [diagnostics_table(records, main + list(ABLATION)), '', cost_table(records), '']
    return '\n'.join(out)


def _terms_computed_with_lam(record: Mapping[str, Any]) -> set:
    """Training terms that mean what their name says for this record's method."""
    if not record.get('preset'):
        return set()
    from lmoe_jax import losses
    method = losses.get_method(record['preset'], record['overrides'])
    if method.needs_lam:
        return {'loss/id', 'loss/logit_mix', 'loss/consistency', 'loss/input_mix'}
    return {'loss/id'}


def diagnostics_table(records, names) -> str:
    """Confidence statistics on the test sets and the training terms at the end of fine-tuning."""
    lines = ['**Diagnostics (test logits; training terms = the trainer\'s logged means over the '
             'last >= 50 fine-tune steps; the standalone loop\'s: the last 50 steps)**', '',
             '| variant | ID mean MSP | fine-OOD mean MSP | ID top-1 margin | fine-OOD top-1 margin '
             '| train id CE | train logit_mix | train consistency | train input_mix |',
             '|' + ' --- |' * 9]
    for name in names:
        rs = [r for r in records if r['variant'] == name]
        if not rs:
            continue

        def mean(get):
            vals = [get(r) for r in rs]
            vals = [v for v in vals if v is not None]
            return f'{np.mean(vals):.3f}' if vals else '-'
        used = _terms_computed_with_lam(rs[0])

        def tm(key):  # a term computed with lam = 1 (methods without mixing) would mislead
            return lambda r: r['train_metrics'].get(key) if key in used else None
        lines.append(
            f'| {name} | {mean(lambda r: r["diag"]["id_test"]["mean_msp"])} '
            f'| {mean(lambda r: r["diag"]["fine_ood_test"]["mean_msp"])} '
            f'| {mean(lambda r: r["diag"]["id_test"]["mean_top1_margin"])} '
            f'| {mean(lambda r: r["diag"]["fine_ood_test"]["mean_top1_margin"])} '
            f'| {mean(tm("loss/id"))} | {mean(tm("loss/logit_mix"))} | {mean(tm("loss/consistency"))} '
            f'| {mean(tm("loss/input_mix"))} |')
    return '\n'.join(lines)


# --------------------------------------------------------------------------------------------------

def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--seeds', default='0,1,2,3,4', help='seeds of the main comparison')
    parser.add_argument('--ablation_seeds', default='0,1,2',
                        help='seeds (among --seeds) of the LMoE ablation, which also choose the '
                             'lmoe candidate on validation; run first')
    parser.add_argument('--variants', default='',
                        help='comma list (default: MAIN, CAP and ABLATION); see VARIANTS')
    parser.add_argument('--baseline_steps', type=int, default=None,
                        help="stage-1 steps (default: the demo config's baseline_epochs, 5 epochs)")
    parser.add_argument('--finetune_steps', type=int, default=None,
                        help="stage-2 steps (default: the demo config's num_epochs, 2 epochs)")
    parser.add_argument('--out', default=None,
                        help='output folder (local or gs://): results.jsonl, scores_*.npz, tables.md')
    parser.add_argument('--id_classes', default=None,
                        help='ID classes of Fashion-MNIST, e.g. 0,1,2,3,8,9 (the default split)')
    parser.add_argument('--split', type=int, default=None,
                        help='instead of --id_classes: MixOE class split N (6 of 10 classes)')
    parser.add_argument('--leave_out', default='',
                        help='ID classes held out as pseudo-OOD (a leave-classes-out selection '
                             'run; the split\'s OOD classes are then read nowhere), e.g. 8,9')
    parser.add_argument('--outlier_val_fraction', type=float, default=0.1,
                        help='share of the Animal-MNIST outliers held out for selection')
    parser.add_argument('--fine_diag_size', type=int, default=2000,
                        help='images of the held-out-class diagnostic (never used to select)')
    parser.add_argument('--finetune_lr', type=float, default=None,
                        help='peak lr of the fine-tune (default: the config learning_rate, 0.05)')
    parser.add_argument('--eval_batch_size', type=int, default=None,
                        help="default: the config's eval_batch_size (500)")
    parser.add_argument('--log_every', type=int, default=None,
                        help="trainer log interval (default: the config's log_every_steps, 100)")
    parser.add_argument('--data_dir', default=str(ROOT / 'runs' / 'tfds'))
    parser.add_argument('--data', action='append', default=[], metavar='KEY=VALUE',
                        help='override config.data.KEY (repeatable), e.g. a folder of test data')
    parser.add_argument('--workdir', default=None,
                        help='caches: the stage-1 and stage-2 trainer runs, compiled programs '
                             '(default: runs/compare, runs/compare_smoke with --smoke)')
    parser.add_argument('--summarize', action='store_true', help='only write the tables')
    parser.add_argument('--smoke', action='store_true',
                        help=f'1 seed, a few steps, variants {SMOKE_VARIANTS}, into runs/compare_smoke')
    args = parser.parse_args(argv)
    if args.smoke:
        args.seeds, args.ablation_seeds, args.baseline_steps, args.finetune_steps = '0', '0', 20, 10
        args.fine_diag_size, args.log_every = 500, 5
        args.variants = args.variants or SMOKE_VARIANTS
        args.workdir = args.workdir or str(ROOT / 'runs' / 'compare_smoke')
        args.out = args.out or args.workdir
        (epath.Path(args.out) / 'results.jsonl').unlink(missing_ok=True)  # always run again
        for cached in epath.Path(args.workdir).glob('seed*_*'):  # retrain too (not jax_cache)
            cached.rmtree()
    args.workdir = args.workdir or str(ROOT / 'runs' / 'compare')
    if not args.out:
        parser.error('--out is required: the folder for results.jsonl, scores_*.npz and tables.md')
    out = epath.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if not args.summarize:
        os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
        from absl import logging as absl_logging
        absl_logging.set_verbosity(absl_logging.WARNING)  # Orbax / TFDS INFO chatter
        run(args)
    text = summarize(read_results(out / 'results.jsonl'))
    (out / 'tables.md').write_text(text + '\n')
    print(text)


if __name__ == '__main__':
    main()
