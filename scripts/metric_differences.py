"""Measure how far our metric columns can sit from each reference's own computation.

Prints the numbers quoted in docs/evaluation.md ("Differences from the references"):

    PYTHONPATH=. .venv/bin/python scripts/metric_differences.py

Every input is synthetic and seeded, so the output is the same on every machine:

1. MixOE columns vs MixOE's walk (a plain loop over the sorted scores, as its script does).
2. The MixOE subsample draw: MixOE samples from the loader order (its OOD loaders shuffle), we
   from the sorted scores; a different order is a different draw, so we report how much the
   10-run mean moves between draws.
3. OpenOOD FPR@95: the full ROC curve (ours) vs sklearn's default ``drop_intermediate=True``.
4. MSP: a float32 softmax (what both references score) vs our log-odds MSP, on logits of a
   confident model where a float32 softmax rounds many images to exactly 1.0.
5. The two tie conventions on MSP-like scores with 30% of ID and 5% of OOD at exactly 1.0.
"""
import jax
import numpy as np
from sklearn import metrics as sk

from lmoe_jax.ood import metrics as M
from lmoe_jax.ood import scores as S


def loop_walk_metrics(known, novel):
    """MixOE's rule as a plain loop: reject the lower next score, the ID one at a tie."""
    known, novel = sorted(known), sorted(novel)
    k = n = 0
    tp, fp = [len(known)], [len(novel)]
    while k < len(known) or n < len(novel):
        if n < len(novel) and (k == len(known) or novel[n] < known[k]):
            n += 1
        else:
            k += 1
        tp.append(len(known) - k)
        fp.append(len(novel) - n)
    tp, fp = np.array(tp), np.array(fp)
    tpr, fpr = tp / tp[0], fp / fp[0]
    tnr = 1 - fpr[np.argmin(np.abs(tpr - 0.95))]
    t, f = np.r_[1.0, tpr, 0.0], np.r_[1.0, fpr, 0.0]
    auroc = sum((t[i] - t[i + 1]) * (2 - f[i] - f[i + 1]) / 2 for i in range(len(t) - 1))
    pts = [(1.0, 0.5)] + [(a / tp[0], a / (a + b)) for a, b in zip(tp, fp) if a + b] + [(0.0, 0.0)]
    aupr = sum((pts[i][0] - pts[i + 1][0]) * (pts[i][1] + pts[i + 1][1]) / 2 for i in range(len(pts) - 1))
    return {'mixoe_tnr95': tnr, 'mixoe_auroc': auroc, 'mixoe_aupr_in': aupr}


def pts(x):
    return f'{100 * x:.3f}'


def confident_logits(rng, n, margin_mean, margin_std, k=150):
    """Logits whose top class leads the others by a normal margin (a confident classifier)."""
    z = rng.normal(0, 1, (n, k)).astype(np.float32)
    z[np.arange(n), rng.integers(0, k, n)] += rng.normal(margin_mean, margin_std, n).astype(np.float32)
    return z


def main():
    rng = np.random.default_rng(0)

    print('1. MixOE columns vs the loop walk (max |difference| in points over 40 random pairs, '
          'half of them with heavy ties)')
    worst = 0.0
    for i in range(40):
        a, b = rng.normal(1, 1, rng.integers(5, 400)), rng.normal(0, 1, rng.integers(5, 400))
        if i % 2:
            a, b = np.round(a, 1), np.round(b, 1)
        ours, ref = M.mixoe_single(a, b), loop_walk_metrics(a, b)
        worst = max(worst, max(abs(ours[k] - ref[k]) for k in ref))
    print(f'   {pts(worst)}')

    print('2. MixOE 10-subsample mean across 20 different draws (ID 4000, OOD 900, AUROC ~0.8): '
          'std and max - min, points')
    ids, oods = rng.normal(1.2, 1, 4000), rng.normal(0, 1, 900)
    draws = [M.mixoe_metrics(ids, oods, seed=s) for s in range(20)]
    for key in ('mixoe_tnr95', 'mixoe_auroc', 'mixoe_aupr_in'):
        v = np.array([d[key] for d in draws])
        print(f'   {key}: std {pts(v.std())}, range {pts(v.max() - v.min())}')

    print('3. OpenOOD FPR@95, full curve (ours) minus drop_intermediate=True (OpenOOD), points, '
          'over 200 random pairs')
    diffs = {'continuous': [], 'ties': []}
    for i in range(200):
        a, b = rng.normal(1, 1, rng.integers(20, 3000)), rng.normal(0, 1, rng.integers(20, 3000))
        kind = 'ties' if i % 2 else 'continuous'
        if kind == 'ties':
            a, b = np.round(a, 1), np.round(b, 1)
        is_ood, conf = np.r_[np.zeros(len(a)), np.ones(len(b))], np.r_[a, b]
        fpr, tpr, _ = sk.roc_curve(is_ood, -conf)
        diffs[kind].append(M.openood_fpr_at_95_tpr(a, b) - fpr[np.argmax(tpr >= 0.95)])
    for kind, d in diffs.items():
        d = np.array(d)
        print(f'   {kind}: max |diff| {pts(np.abs(d).max())}, nonzero in {np.mean(d != 0) * 100:.0f}% of pairs')
    same = np.arange(100.0)  # ID and OOD identical: the ROC curve is one straight diagonal
    fpr, tpr, _ = sk.roc_curve(np.r_[np.zeros(100), np.ones(100)], -np.r_[same, same])
    print(f'   collinear tied points (ID scores == OOD scores, 0..99): ours '
          f'{pts(M.openood_fpr_at_95_tpr(same, same))}, drop_intermediate {pts(fpr[np.argmax(tpr >= 0.95)])}')

    print('4. MSP as a float32 softmax (references) vs our log-odds MSP, confident model '
          '(150 classes, ID margin N(20, 6), OOD margin N(12, 6), 5000 + 5000 images)')
    id_z, ood_z = confident_logits(rng, 5000, 20, 6), confident_logits(rng, 5000, 12, 6)
    soft = [np.asarray(jax.nn.softmax(z).max(-1), np.float64) for z in (id_z, ood_z)]
    ours = [np.asarray(S.msp(z), np.float64) for z in (id_z, ood_z)]
    print(f'   at exactly 1.0 in float32: ID {np.mean(soft[0] == 1) * 100:.1f}%, '
          f'OOD {np.mean(soft[1] == 1) * 100:.1f}%; distinct log-odds values: '
          f'{len(np.unique(ours[0]))}/5000 ID, {len(np.unique(ours[1]))}/5000 OOD')
    for name, pair in (('float32 softmax', soft), ('log-odds (ours)', ours)):
        o, x = M.openood_metrics(*pair), M.mixoe_metrics(*pair)
        print(f'   {name}: ' + ', '.join(f'{k} {pts(v)}' for k, v in {**o, **x}.items() if not k.endswith('_std')))

    tempered = [z / np.float32(1000.0) for z in (id_z, ood_z)]  # ODIN's T = 1000: far from saturation
    soft_t = [np.asarray(jax.nn.softmax(z).max(-1), np.float64) for z in tempered]
    ours_t = [np.asarray(S.msp(z), np.float64) for z in tempered]
    print("   the same logits / 1000 (ODIN's temperature): "
          f'distinct float32 softmax values '
          f'{len(np.unique(np.r_[soft_t[0], soft_t[1]]))}/10000; AUROC {pts(M.openood_auroc(*soft_t))} '
          f'(float32 softmax) vs {pts(M.openood_auroc(*ours_t))} (log-odds)')

    print('5. MSP-like scores, 30% of ID and 5% of OOD at 1.0 (2000 + 2000): half credit for ties '
          '(sklearn, the old mixoe_*) vs MixOE\'s walk, points')
    ids = np.where(rng.random(2000) < 0.3, 1.0, rng.uniform(0.5, 1.0, 2000))
    oods = np.where(rng.random(2000) < 0.05, 1.0, rng.uniform(0.2, 1.0, 2000))
    walk = M.mixoe_single(ids, oods)
    is_id, conf = np.r_[np.ones(2000), np.zeros(2000)], np.r_[ids, oods]
    p, r, _ = sk.precision_recall_curve(is_id, conf)
    print(f'   AUROC {pts(M.openood_auroc(ids, oods))} vs {pts(walk["mixoe_auroc"])}; '
          f'AUPR-In {pts(sk.auc(r, p))} vs {pts(walk["mixoe_aupr_in"])}')


if __name__ == '__main__':
    main()
