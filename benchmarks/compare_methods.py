"""Paired comparison of the OE-family presets and the LMoE ablation on the Fashion-MNIST demo.

The demo config's own protocol (configs/fashion_mnist.py), per seed ``s``:

1. train ONE cross-entropy baseline for the config's ``baseline_epochs`` (5 epochs, cached);
2. fine-tune that same checkpoint with every variant for the config's ``num_epochs`` (2 epochs,
   its learning rate) on the very same batches (ID order and outlier draws, kept once per seed)
   with the very same rng, so lam draws agree step by step (``train_step`` folds in the step);
3. evaluate MSP and Energy scores on the validation sets, which alone may choose anything
   (ID val = held-out share of ID train; outlier val = held-out auxiliary outliers the train
   stream never draws), on the test sets (ID test, fine-grained OOD test, coarse OOD digits), and
   on a diagnostic reported apart and never used to choose ('fine_ood_diag': training images of
   the held-out classes, i.e. of the classes the test calls OOD).

The ablation seeds (``--ablation_seeds``, default 0,1,2) run first with every variant; their
validation numbers choose the lmoe candidate (``select_lmoe``), which then also runs on the
remaining seeds with the main variants. The class split is an argument (``--id_classes`` or
``--split=N``). Everything goes to ``--out``: one JSON line per finished (seed, variant) in
``results.jsonl`` (a rerun skips what is there for the same protocol, so the script resumes),
the per-image logits and scores of that run in ``scores_seed<s>_<variant>.npz`` beside it, and
``tables.md``. ``--summarize`` only reads the JSONL and writes the tables.

    .venv/bin/python benchmarks/compare_methods.py --out=benchmarks/results/study_split0 --id_classes=0,1,2,3,8,9
    .venv/bin/python benchmarks/compare_methods.py --out=benchmarks/results/study_split1 --split=1
    .venv/bin/python benchmarks/compare_methods.py --out=... --summarize   # tables only
    .venv/bin/python benchmarks/compare_methods.py --smoke   # 1 seed, a few steps, 3 variants
"""
from __future__ import annotations

import argparse
import functools
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
VARIANTS = {**MAIN, **ABLATION, **EXTRA}
#: the reconstructed LMoE variants clean validation chooses among (the preset and its ablation)
LMOE_CANDIDATES = (LMOE_REFERENCE, 'lmoe:kl', 'lmoe:consistency0.1', 'lmoe:consistency3',
                   'lmoe:logit_mix1', 'lmoe:+input_mix5')
#: a candidate may not lose more ID validation accuracy than this (points) to the baseline control
SELECTION_MAX_ACC_DROP = 1.0
SCORES = ('msp', 'energy')
SMOKE_VARIANTS = 'baseline,mixoe_mixup,lmoe'


# --------------------------------------------------------------------------------------------------
# Set-up: config, data, model
# --------------------------------------------------------------------------------------------------

def parse_classes(text: str) -> List[int]:
    return sorted(int(c) for c in text.split(',') if c.strip())


def demo_config(data_dir: str, *, id_classes: Optional[Sequence[int]] = None,
                split: Optional[int] = None, outlier_val_fraction: float = 0.1,
                data_overrides: Sequence[str] = ()):
    """The demo config with a class split (explicit ID classes, or MixOE split ``split`` of
    the config's 6 of 10; neither: the config's own {0, 1, 2, 3, 8, 9}), the share of the
    outliers held out for validation and ``KEY=VALUE`` overrides of ``config.data`` (the value
    parsed as the field's type; a tuple field takes a comma list)."""
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
    cfg.data.outlier_val_fraction = float(outlier_val_fraction)
    return cfg


def load_eval_arrays(cfg, fine_diag_size: int, batch_size: int = 1000) -> Dict[str, Dict[str, np.ndarray]]:
    """Every validation, test and diagnostic set once, as host arrays {name: {'image', 'label'}}.

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


def build_model(cfg, num_classes: int):
    from lmoe_jax import models
    return models.create_model(cfg.model, num_classes)


def fresh_state(cfg, model, image_shape, total_steps: int, rng, params=None, batch_stats=None):
    """A TrainState with a new optimiser and a cosine schedule over ``total_steps``: initialised
    from ``rng``, or (stage 2) starting from given params / batch stats with step 0."""
    import jax
    import jax.numpy as jnp
    from lmoe_jax import train
    tx, lr_fn = train.make_optimizer(cfg, total_steps)
    if params is None:
        return train.create_train_state(rng, model, tx, lr_fn, tuple(image_shape))
    params, batch_stats = jax.device_put((params, batch_stats))
    return train.TrainState(step=jnp.zeros((), jnp.int32), params=params, batch_stats=batch_stats,
                            opt_state=tx.init(params), apply_fn=model.apply, tx=tx, lr_fn=lr_fn)


# --------------------------------------------------------------------------------------------------
# Training and evaluation
# --------------------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def _step_fn(method):
    import jax
    from lmoe_jax import train
    return jax.jit(functools.partial(train.train_step, method=method), donate_argnums=(0,))


def run_steps(state, batches: Iterable[dict], rng, method, label: str, total: int,
              log_every: int) -> tuple[Any, Dict[str, float], float]:
    """Train on ``batches``; returns (state, mean of each metric over the last 50 steps, seconds)."""
    import jax
    step_fn = _step_fn(method)
    tail: List[dict] = []
    start = time.perf_counter()
    for i, batch in enumerate(batches):
        state, metrics = step_fn(state, batch, rng)
        if i >= total - 50:
            tail.append(metrics)
        if log_every and (i + 1) % log_every == 0:
            loss = float(metrics['loss/total'])
            if not np.isfinite(loss):
                raise FloatingPointError(f'{label}: non-finite loss at step {i + 1}')
            print(f'    {label}: step {i + 1}/{total} loss {loss:.4f} '
                  f'({(time.perf_counter() - start) / (i + 1):.3f} s/step)', flush=True)
    jax.block_until_ready(state)
    seconds = time.perf_counter() - start
    tail = jax.device_get(tail)
    means = {k: float(np.mean([m[k] for m in tail])) for k in tail[0]} if tail else {}
    return state, means, seconds


@functools.lru_cache(maxsize=None)
def _logits_fn(apply_fn):
    import jax
    return jax.jit(lambda variables, x: apply_fn(variables, x, train=False))


def predict_logits(state, images: np.ndarray, batch_size: int) -> np.ndarray:
    """Logits in fixed-size padded batches (one compilation for every set)."""
    fn = _logits_fn(state.apply_fn)
    variables = {'params': state.params, 'batch_stats': state.batch_stats}
    out = []
    for lo in range(0, len(images), batch_size):
        chunk = images[lo:lo + batch_size]
        pad = batch_size - len(chunk)
        if pad:
            chunk = np.concatenate([chunk, np.zeros((pad, *chunk.shape[1:]), chunk.dtype)])
        out.append(np.asarray(fn(variables, chunk), np.float64)[:batch_size - pad])
    return np.concatenate(out)


def score_logits(logits: np.ndarray) -> Dict[str, np.ndarray]:
    from lmoe_jax.ood import scores as scores_lib
    return {'msp': np.asarray(scores_lib.msp(logits), np.float64),
            'energy': np.asarray(scores_lib.energy(logits), np.float64)}


def metric_groups(arrays: Mapping[str, Mapping[str, Any]]) -> Dict[str, tuple]:
    """group -> (ID set, {OOD kind: sets}). 'val' is the only group that may choose anything;
    'fine_diag' uses the held-out classes' training images and is reported apart."""
    return {'val': ('id_val', {'outlier': ['outlier_val']}),
            'fine_diag': ('id_val', {'fine': ['fine_ood_diag']}),
            'test': ('id_test', {'fine': ['fine_ood_test'],
                                 'coarse': [n for n, a in arrays.items() if a['kind'] == 'coarse_ood']})}


def evaluate_state(state, arrays: Mapping[str, Mapping[str, np.ndarray]],
                   batch_size: int) -> tuple[dict, Dict[str, np.ndarray]]:
    """(metrics, per-image arrays). Metrics: ID accuracy and, per score, AUROC / FPR@95 (OpenOOD:
    OOD positive) of every group of ``metric_groups``, plus a few logit statistics. Per-image:
    '<set>/logits', '<set>/<score>' and '<set>/label' of every set."""
    from lmoe_jax.ood import metrics as M
    logits = {name: predict_logits(state, a['image'], batch_size) for name, a in arrays.items()}
    scores = {name: score_logits(z) for name, z in logits.items()}
    out = {}
    for group, (id_name, ood) in metric_groups(arrays).items():
        res = {'id_acc': float(np.mean(np.argmax(logits[id_name], -1) == arrays[id_name]['label']))}
        for score in SCORES:
            id_conf = scores[id_name][score]
            for kind, names in ood.items():
                if not names:
                    continue
                ood_conf = np.concatenate([scores[n][score] for n in names])
                res[f'{score}/{kind}_auroc'] = M.openood_auroc(id_conf, ood_conf)
                res[f'{score}/{kind}_fpr95'] = M.openood_fpr_at_95_tpr(id_conf, ood_conf)
        out[group] = res
    diag = {}
    for name in ('id_test', 'fine_ood_test'):
        z = logits[name]
        top2 = np.sort(z, axis=-1)[:, -2:]
        # msp is the log-odds of the max softmax probability; the mean is of the probability
        diag[name] = {'mean_msp': float((1.0 / (1.0 + np.exp(-scores[name]['msp']))).mean()),
                      'mean_energy': float(scores[name]['energy'].mean()),
                      'mean_top1_margin': float(np.mean(top2[:, 1] - top2[:, 0])),
                      'mean_logit_std': float(np.mean(np.std(z, axis=-1)))}
    out['diag'] = diag
    per_image = {}
    for name in arrays:
        per_image[f'{name}/label'] = np.asarray(arrays[name]['label'])
        per_image[f'{name}/logits'] = logits[name].astype(np.float32)
        per_image.update({f'{name}/{score}': scores[name][score] for score in SCORES})
    return out, per_image


# --------------------------------------------------------------------------------------------------
# Per-seed caches: the baseline checkpoint and the fine-tune batches
# --------------------------------------------------------------------------------------------------

def seed_dir(workdir: epath.PathLike, seed: int, protocol: Mapping[str, Any]) -> epath.Path:
    """The seed's cache folder; its name holds everything the cached baseline depends on."""
    tag = (f"b{protocol['baseline_steps']}_f{protocol['finetune_steps']}_bs{protocol['batch_size']}"
           f"_id{'-'.join(map(str, protocol['id_classes']))}_ov{protocol['outlier_val_fraction']:g}")
    path = epath.Path(workdir) / tag / f'seed{seed}'
    path.mkdir(parents=True, exist_ok=True)
    return path


def _atomic_save(path: epath.Path, data: bytes) -> None:
    tmp = path.parent / (path.name + '.tmp')
    tmp.write_bytes(data)
    tmp.replace(path)


def _npz_bytes(arrays: Mapping[str, np.ndarray]) -> bytes:
    buffer = io.BytesIO()
    np.savez_compressed(buffer, **arrays)
    return buffer.getvalue()


def prepare_seed(cfg, model, image_shape, seed: int, protocol: Mapping[str, Any], workdir: str, log_every: int):
    """The seed's baseline state and fine-tune batches, from the cache or computed now.

    The stream of seed ``s`` gives the baseline its first ``baseline_steps`` batches and every
    fine-tune the next ``finetune_steps`` ones (the same arrays for every variant).
    """
    import jax
    from flax import serialization
    from lmoe_jax import data, losses
    path = seed_dir(workdir, seed, protocol)
    ckpt, batch_file = path / 'baseline.msgpack', path / 'finetune_batches.npz'
    b_steps, f_steps = protocol['baseline_steps'], protocol['finetune_steps']
    init_rng, base_rng = jax.random.split(jax.random.PRNGKey(seed))
    template = fresh_state(cfg, model, image_shape, b_steps, init_rng)
    if ckpt.exists() and batch_file.exists():
        restored = serialization.from_bytes(
            {'params': template.params, 'batch_stats': template.batch_stats}, ckpt.read_bytes())
        with np.load(io.BytesIO(batch_file.read_bytes())) as z:
            batches = {k: z[k] for k in z.files}
        print(f'  seed {seed}: baseline and fine-tune batches loaded from {path}', flush=True)
        return restored, batches, None
    stream = data.train_stream(cfg.data, batch_size=protocol['batch_size'], seed=seed,
                               process_index=0, process_count=1)
    t0 = time.perf_counter()
    state, _, seconds = run_steps(template, (next(stream) for _ in range(b_steps)), base_rng,
                                  losses.get_method('baseline'), f'seed {seed} baseline', b_steps,
                                  log_every)
    collected = [next(stream) for _ in range(f_steps)]
    batches = {k: np.stack([b[k] for b in collected]) for k in ('image', 'label', 'ood_image')}
    restored = {'params': jax.device_get(state.params), 'batch_stats': jax.device_get(state.batch_stats)}
    _atomic_save(ckpt, serialization.to_bytes(restored))
    _atomic_save(batch_file, _npz_bytes(batches))
    print(f'  seed {seed}: baseline trained in {seconds:.0f}s (with data {time.perf_counter() - t0:.0f}s)',
          flush=True)
    return restored, batches, seconds


# --------------------------------------------------------------------------------------------------
# Results file
# --------------------------------------------------------------------------------------------------

def normalized(protocol: Mapping[str, Any]) -> Dict[str, Any]:
    """Records written before --finetune_lr existed fine-tuned at the stage-1 learning rate."""
    return {'finetune_lr': protocol['learning_rate'], **protocol}


def read_results(path: epath.PathLike) -> List[dict]:
    path = epath.Path(path)
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def append_result(path: epath.PathLike, record: Mapping[str, Any]) -> None:
    """Add one line by rewriting the (small) file atomically: works on gs:// too."""
    path = epath.Path(path)
    text = path.read_text() if path.exists() else ''
    _atomic_save(path, (text + json.dumps(record, sort_keys=True) + '\n').encode())


def scores_name(seed: int, variant: str) -> str:
    """File of a run's per-image arrays, beside results.jsonl (variant names hold ':' and '+')."""
    return f"scores_seed{seed}_{re.sub(r'[^A-Za-z0-9._-]', '_', variant)}.npz"


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


def run(args) -> None:
    import jax
    from lmoe_jax import losses
    # Persistent compilation cache: resumed / split invocations do not recompile every variant.
    from lmoe_jax import data
    jax.config.update('jax_compilation_cache_dir', str(epath.Path(args.workdir) / 'jax_cache'))
    jax.config.update('jax_persistent_cache_min_compile_time_secs', 1.0)
    cfg = demo_config(args.data_dir, id_classes=parse_classes(args.id_classes or ''),
                      split=args.split, outlier_val_fraction=args.outlier_val_fraction,
                      data_overrides=args.data)
    split = data.class_split(cfg.data.num_classes, cfg.data.num_id_classes, cfg.data.split,
                             cfg.data.id_classes)
    info = data.dataset_info(cfg.data, process_count=1)
    steps_per_epoch = info.steps_per_epoch(int(cfg.batch_size))  # as the trainer counts them
    baseline_steps = args.baseline_steps or max(
        int(round(float(cfg.baseline_epochs) * steps_per_epoch)), 1)
    finetune_steps = args.finetune_steps or max(int(round(float(cfg.num_epochs) * steps_per_epoch)), 1)
    protocol = {'baseline_steps': baseline_steps, 'finetune_steps': finetune_steps,
                'batch_size': int(cfg.batch_size), 'learning_rate': float(cfg.learning_rate),
                'model': f'{cfg.model.name}-w{cfg.model.width}',
                'finetune_lr': float(args.finetune_lr or cfg.learning_rate),
                'id_classes': list(split.id_classes),
                'outlier_val_fraction': float(cfg.data.outlier_val_fraction),
                'fine_diag_size': args.fine_diag_size, 'selection': 'id_val+outlier_val'}
    ft_cfg = cfg.copy_and_resolve_references()
    ft_cfg.learning_rate = protocol['finetune_lr']
    names = [n for n in args.variants.split(',') if n] if args.variants else list(MAIN) + list(ABLATION)
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        raise SystemExit(f'unknown variant(s) {unknown}; choose from {list(VARIANTS)}')
    seeds = [int(s) for s in args.seeds.split(',')]
    ablation_seeds = [int(s) for s in args.ablation_seeds.split(',') if s] or seeds
    if not set(ablation_seeds) <= set(seeds):
        raise SystemExit(f'--ablation_seeds {ablation_seeds} must be among --seeds {seeds}')
    results = epath.Path(args.out) / 'results.jsonl'

    def pending():
        records = [r for r in read_results(results) if normalized(r['protocol']) == protocol]
        done = {(r['seed'], r['variant']) for r in records}
        todo = [p for p in plan(names, seeds, ablation_seeds) if p not in done]
        chosen = select_lmoe(records, ablation_seeds)
        if chosen and chosen['variant'] != LMOE_REFERENCE:  # the chosen one joins the main table
            todo += [(s, chosen['variant']) for s in seeds if (s, chosen['variant']) not in done]
        return todo, len(done)

    todo, n_done = pending()
    print(f'protocol {protocol}\n{steps_per_epoch} steps per epoch; {len(todo)} runs to do, '
          f'{n_done} already in {results}', flush=True)
    if not todo:
        return
    image_shape = tuple(info.image_shape)
    model = build_model(cfg, info.num_id_classes)
    t0 = time.perf_counter()
    arrays = load_eval_arrays(cfg, args.fine_diag_size)
    print('eval sets: ' + ', '.join(f"{k} {len(v['label'])}" for k, v in arrays.items())
          + f' ({time.perf_counter() - t0:.0f}s)', flush=True)
    per_seed: Dict[int, tuple] = {}
    start_all = time.perf_counter()
    finished = 0
    while todo:
        seed, name = todo[0]
        if seed not in per_seed:
            restored, batches, base_seconds = prepare_seed(
                cfg, model, image_shape, seed, protocol, args.workdir, args.log_every)
            per_seed[seed] = (restored, batches, base_seconds)
        restored, batches, base_seconds = per_seed[seed]
        state = fresh_state(ft_cfg, model, image_shape, finetune_steps, None,
                            params=restored['params'], batch_stats=restored['batch_stats'])
        t_run = time.perf_counter()
        record = {'seed': seed, 'variant': name, 'protocol': protocol}
        if name == 'stage1':  # the baseline checkpoint itself, before any fine-tuning
            # train_seconds: the baseline's training when this process trained it (else None)
            record.update(preset=None, overrides={}, train_seconds=base_seconds, train_metrics={})
        else:
            preset, overrides = VARIANTS[name]
            method = losses.get_method(preset, overrides)
            ft_rng = jax.random.fold_in(jax.random.PRNGKey(seed), 1)  # same for every variant
            stream = ({k: batches[k][j] for k in ('image', 'label', 'ood_image')}
                      for j in range(finetune_steps))
            state, tail, seconds = run_steps(state, stream, ft_rng, method, f'seed {seed} {name}',
                                             finetune_steps, args.log_every)
            record.update(preset=preset, overrides=overrides, train_seconds=seconds, train_metrics=tail)
        metrics, per_image = evaluate_state(state, arrays, args.eval_batch_size)
        record.update(metrics, scores_file=scores_name(seed, name))
        _atomic_save(results.parent / record['scores_file'], _npz_bytes(per_image))
        record['seconds'] = time.perf_counter() - t_run
        record['load_average'] = os.getloadavg()[0]
        append_result(results, record)  # after its scores file: a listed run has its scores
        finished += 1
        todo, _ = pending()
        elapsed = time.perf_counter() - start_all
        print(f"[{finished}/{finished + len(todo)}] seed {seed} {name}: "
              f"val outlier AUROC {100 * record['val']['msp/outlier_auroc']:.2f}, "
              f"test fine AUROC {100 * record['test']['msp/fine_auroc']:.2f}, "
              f"test acc {100 * record['test']['id_acc']:.2f} "
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


def _by_variant(records: Sequence[dict], split: str, key: str) -> Dict[str, Dict[int, float]]:
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
    data = {key: _by_variant(records, split, key) for key, _ in columns}
    auroc, fpr = _by_variant(records, split, auroc_key), _by_variant(records, split, fpr_key)
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
        sections.append(f"## Fine-tune lr {protocol['finetune_lr']:g}, {protocol['baseline_steps']} "
                        f"baseline + {protocol['finetune_steps']} fine-tune steps\n\n"
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
    lines = ['| variant | runs | train s (mean) | run s (mean) | run s (total) | load (mean) |',
             '| --- | --- | --- | --- | --- | --- |']
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
        lines.append(f"| {n} | {len(rs)} | {np.mean(train) if train else float('nan'):.0f} | "
                     f"{np.mean(run_s):.0f} | {sum(run_s):.0f} | "
                     f"{np.mean(loads) if loads else float('nan'):.2f} |")
    title = (f'**Cost per (seed, variant)** (wall seconds; "stage1" = the shared baseline, trained '
             f'once per seed, plus its evaluation; run = training + evaluation of all sets + writing '
             f'the scores). Total: {total / 60:.1f} min over {len(records)} runs.')
    return '\n'.join([title, ''] + lines)


def summarize_protocol(records: Sequence[dict], protocol: Mapping[str, Any]) -> str:
    selection, chosen = selection_table(records)
    picks = [chosen['variant'], chosen['leader']] if chosen else []
    extra = [n for n in dict.fromkeys(picks) if n not in MAIN]
    main = ['stage1'] + list(MAIN) + extra
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
    lines = ['**Diagnostics (test logits; training terms = mean of the last 50 fine-tune steps)**', '',
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
                        help='comma list (default: MAIN and ABLATION); see VARIANTS')
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
    parser.add_argument('--outlier_val_fraction', type=float, default=0.1,
                        help='share of the Animal-MNIST outliers held out for selection')
    parser.add_argument('--fine_diag_size', type=int, default=2000,
                        help='images of the held-out-class diagnostic (never used to select)')
    parser.add_argument('--finetune_lr', type=float, default=None,
                        help='peak lr of the fine-tune (default: the config learning_rate, 0.05)')
    parser.add_argument('--eval_batch_size', type=int, default=1000)
    parser.add_argument('--log_every', type=int, default=40)
    parser.add_argument('--data_dir', default=str(ROOT / 'runs' / 'tfds'))
    parser.add_argument('--data', action='append', default=[], metavar='KEY=VALUE',
                        help='override config.data.KEY (repeatable), e.g. a folder of test data')
    parser.add_argument('--workdir', default=None,
                        help='caches: baselines, fine-tune batches, compiled steps '
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
    args.workdir = args.workdir or str(ROOT / 'runs' / 'compare')
    if not args.out:
        parser.error('--out is required: the folder for results.jsonl, scores_*.npz and tables.md')
    out = epath.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if not args.summarize:
        run(args)
    text = summarize(read_results(out / 'results.jsonl'))
    (out / 'tables.md').write_text(text + '\n')
    print(text)


if __name__ == '__main__':
    main()
