"""Images per second of the OOD evaluation pass: the path evaluate() runs for every batch.

Synthetic images, so only the model and the scores are timed (no input pipeline). Each timed
batch goes through ``make_forward``/``model_outputs`` (one forward pass giving logits and
features, plus ODIN's input gradient and second forward pass) and ``score_outputs`` (every other
score), copied back to the host, as evaluate() does. Each configuration is timed twice: with
every score and with MSP only (one forward pass), so the price of ODIN is visible. Statistics of
the fitted scores are fitted first on a few synthetic batches (not timed).

    .venv/bin/python benchmarks/evaluate.py --model=small_cnn --image_size=28 --batch_size=256
    .venv/bin/python benchmarks/evaluate.py --model=resnet18 --image_size=64 --batch_size=64
    .venv/bin/python benchmarks/evaluate.py --model=resnet50 --image_size=448 --batch_size=64  # accelerator
"""
import argparse
import json
import os
import sys
import time

from etils import epath
import jax
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), '..'))

from lmoe_jax import evaluate as ev  # noqa: E402
from lmoe_jax import models  # noqa: E402


def build(name: str, image_size: int, channels: int, num_classes: int, dtype: str):
    model = models.create_model({'name': name, 'dtype': dtype}, num_classes)
    x = np.zeros((1, image_size, image_size, channels), np.float32)
    variables = jax.jit(lambda r: model.init(r, x, train=False))(jax.random.PRNGKey(0))
    return model, variables


def time_pass(one_batch, num_batches: int, warmup: int, batch_size: int) -> float:
    for _ in range(warmup):  # compilation and first-run costs
        one_batch()
    start = time.perf_counter()
    for _ in range(num_batches):
        one_batch()
    return num_batches * batch_size / (time.perf_counter() - start)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--model', default='small_cnn')
    parser.add_argument('--image_size', type=int, default=28)
    parser.add_argument('--channels', type=int, default=None, help='default: 1 for small_cnn, else 3')
    parser.add_argument('--num_classes', type=int, default=10)
    parser.add_argument('--batch_size', type=int, default=256)
    parser.add_argument('--num_batches', type=int, default=10)
    parser.add_argument('--warmup', type=int, default=2)
    parser.add_argument('--dtype', default='float32')
    parser.add_argument('--json', default=None, help='append the result as one JSON line to this file')
    args = parser.parse_args()
    channels = args.channels or (1 if args.model == 'small_cnn' else 3)

    model, variables = build(args.model, args.image_size, channels, args.num_classes, args.dtype)
    rng = np.random.default_rng(0)
    images = rng.normal(size=(args.batch_size, args.image_size, args.image_size, channels)).astype(np.float32)
    labels = rng.integers(0, args.num_classes, args.batch_size).astype(np.int32)
    batch = {'image': images, 'label': labels, 'mask': np.ones(len(images), bool)}
    source = lambda: iter([batch])  # noqa: E731
    fit = lambda: iter([batch] * 2)  # noqa: E731
    config = ev.ScoreConfig(odin_input_std='none')

    results = {'device': str(jax.devices()[0].device_kind), 'backend': jax.default_backend(),
               'model': args.model, 'image_size': args.image_size, 'batch_size': args.batch_size,
               'dtype': args.dtype, 'num_batches': args.num_batches}
    for label, scores in (('all_scores', ev.DEFAULT_SCORES), ('msp_only', ('msp',))):
        features = any(s in ev.scores_lib.FEATURE_SCORES for s in scores)
        stats = {}
        if any(s in ev.scores_lib.FITTED_SCORES for s in scores):
            fit_forward = ev.make_forward(model.apply, features=True)
            stream = lambda: ev.model_outputs(fit_forward, variables, fit, what='fit')  # noqa: E731
            fc = variables['params']['fc']
            stats = ev.fit_statistics(scores, config, (fc['kernel'], fc['bias']), stream, None)
        forward = ev.make_forward(model.apply, features=features, odin=config if 'odin' in scores else None)

        def one_batch():
            for outputs in ev.model_outputs(forward, variables, source, log_every_s=600.0):
                ev.score_outputs(outputs, stats, scores, config)
        results[f'{label}_images_per_s'] = round(
            time_pass(one_batch, args.num_batches, args.warmup, len(images)), 1)
    print(json.dumps(results))
    if args.json:
        with epath.Path(args.json).open('a') as f:
            f.write(json.dumps(results) + '\n')


if __name__ == '__main__':
    main()
