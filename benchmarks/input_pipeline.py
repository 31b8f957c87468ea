"""Images per second of the train stream: 448 px (JPEG decode + MixOE augmentation) and 28 px.

Counts every image the stream produces (ID + outlier: 2B per batch). On 448 px it uses the
FGVC-Aircraft builder over fake JPEGs it writes (500x375, smooth content so their size and
decode cost resemble photos) unless --data_dir already holds a prepared fgvc_aircraft; on 28 px
the real Fashion-MNIST / Animal-MNIST demo sets (or fake idx files when they are missing).

Per core: run pinned, e.g. `taskset -c 0 .venv/bin/python benchmarks/input_pipeline.py`.
"""
from __future__ import annotations

import argparse
import io
import os
import sys
import tarfile
import tempfile
import time

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), '..'))

import ml_collections  # noqa: E402
import numpy as np  # noqa: E402

import common  # noqa: E402
from lmoe_jax import data  # noqa: E402


def _photo_like_jpeg(rng: np.random.RandomState, height=375, width=500) -> bytes:
    from PIL import Image
    coarse = rng.randint(0, 256, size=(height // 25 + 1, width // 25 + 1, 3)).astype(np.uint8)
    image = Image.fromarray(coarse).resize((width, height), Image.BICUBIC)
    buffer = io.BytesIO()
    image.save(buffer, format='JPEG', quality=90)
    return buffer.getvalue()


def write_fake_aircraft(manual_dir: str, num_images: int) -> None:
    """A fake fgvc-aircraft-2013b.tar.gz: 100 variants, ``num_images`` JPEGs, all in trainval."""
    rng = np.random.RandomState(0)
    variants = [f'V{i:03d}' for i in range(100)]
    lines = [f'{1000000 + i} {variants[i % 100]}' for i in range(num_images)]
    entries = {'variants.txt': '\n'.join(variants).encode(),
               'images_variant_trainval.txt': '\n'.join(lines).encode(),
               'images_variant_test.txt': lines[0].encode()}
    for i in range(num_images):
        entries[f'images/{1000000 + i}.jpg'] = _photo_like_jpeg(rng)
    os.makedirs(manual_dir, exist_ok=True)
    with tarfile.open(os.path.join(manual_dir, 'fgvc-aircraft-2013b.tar.gz'), 'w:gz') as tar:
        for name, content in entries.items():
            info = tarfile.TarInfo(f'fgvc-aircraft-2013b/data/{name}')
            info.size = len(content)
            tar.addfile(info, io.BytesIO(content))


def config_448(data_dir: str, manual_dir: str) -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(dict(
        dataset='fgvc_aircraft', data_dir=data_dir, manual_dir=manual_dir, download=False,
        num_classes=100, num_id_classes=100, split=0, id_classes=None,
        outlier_dataset='fgvc_aircraft', coarse_ood=(), val_fraction=0.0, image_size=448,
        resize_size=512, grayscale=False, normalize='imagenet', color_jitter=True,
        random_flip=True, shuffle_buffer=1000))


def config_28(data_dir: str) -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(dict(
        dataset='fashion_mnist_idx', data_dir=data_dir, num_classes=10, num_id_classes=6,
        split=0, id_classes=[0, 1, 2, 3, 8, 9], outlier_dataset='animal_mnist',
        coarse_ood=(), val_fraction=0.0, image_size=28, resize_size=None, grayscale=True,
        normalize='none', color_jitter=False, random_flip=True, crop_padding=2,
        shuffle_buffer=10000))


def measure(cfg, batch_size: int, steps: int, warmup: int) -> float:
    stream = data.train_stream(cfg, batch_size=batch_size, seed=0, process_index=0, process_count=1)
    for _ in range(warmup):
        next(stream)
    start = time.perf_counter()
    for _ in range(steps):
        batch = next(stream)
    elapsed = time.perf_counter() - start
    assert batch['image'].shape[0] == batch['ood_image'].shape[0] == batch_size
    return 2 * batch_size * steps / elapsed


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--data_dir', default=None, help='TFDS data_dir (default: a temp dir)')
    parser.add_argument('--num_images', type=int, default=256, help='fake 448 px JPEGs to write')
    parser.add_argument('--batch_size', type=int, default=32)
    parser.add_argument('--steps', type=int, default=20, help='measured steps at 448 px')
    parser.add_argument('--steps_28', type=int, default=200, help='measured steps at 28 px')
    args = parser.parse_args(argv)
    cores = common.machine()['cpus_available']
    with tempfile.TemporaryDirectory() as tmp:
        data_dir = args.data_dir or os.path.join(tmp, 'tfds')
        manual_dir = os.path.join(tmp, 'manual')
        write_fake_aircraft(manual_dir, args.num_images)
        rate_448 = measure(config_448(data_dir, manual_dir), args.batch_size, args.steps, warmup=3)
        rate_28 = measure(config_28(data_dir), args.batch_size * 4, args.steps_28, warmup=10)
    print(f'cores available: {cores}')
    print(f'448 px (JPEG decode, resize 512, crop 448, flip, jitter): {rate_448:8.1f} images/s'
          f'  = {rate_448 / cores:8.1f} per core')
    print(f' 28 px (PNG decode, pad-2 crop, flip):                   {rate_28:8.1f} images/s'
          f'  = {rate_28 / cores:8.1f} per core')


if __name__ == '__main__':
    main()
