"""Time from start to the first train step: a fresh run vs a restart (persistent XLA cache).

  .venv/bin/python benchmarks/startup.py --out=benchmarks/results/startup.json

Runs ``main.py`` with the demo config (``configs/fashion_mnist.py``, stage 2 only, log every step)
three times on the same data: (1) a fresh workdir, so an empty compilation cache in
``<workdir>/jax_cache``; SIGTERM after the first logged step; (2) the same command again, which
resumes and finds the compiled programs in the cache; (3) a restart with the cache disabled
(``--config.compilation_cache_dir=``), to separate what the cache saves from the rest of start-up
(imports, data, restore). The datasets are prepared once beforehand, outside the timings.
"""
from __future__ import annotations

import argparse
import re
import signal
import subprocess
import sys
import tempfile
import time

import common

STEP_LINE = re.compile(r'\[lmoe\] step +(\d+)/')


def _time_to_first_step(command: list[str]) -> dict:
    """Seconds from launch to the first step line; then SIGTERM, and wait for a clean exit."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(command, cwd=str(common.ROOT), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=common.worker_env())
    first, step, lines = None, None, []
    for line in proc.stdout:
        lines.append(line)
        match = STEP_LINE.search(line)
        if match:
            first, step = time.perf_counter() - t0, int(match.group(1))
            proc.send_signal(signal.SIGTERM)
            break
    proc.communicate(timeout=300)
    if first is None:
        raise RuntimeError('no step line:\n' + ''.join(lines[-30:]))
    return {'seconds_to_first_step': round(first, 2), 'first_step': step,
            'returncode': proc.returncode}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--out', default='benchmarks/results/startup.json')
    args = parser.parse_args()
    root = tempfile.mkdtemp(prefix='startup_')
    data_dir = f'{root}/tfds'
    base = [sys.executable, 'main.py', '--config=configs/fashion_mnist.py', '--mode=train',
            '--config.baseline_epochs=0', '--config.num_train_steps=1000',
            '--config.log_every_steps=1', f'--config.data.data_dir={data_dir}']
    subprocess.run(base[:-1] + [f'--config.data.data_dir={data_dir}',
                                f'--workdir={root}/prepare', '--config.num_train_steps=1'],
                   cwd=str(common.ROOT), check=True, capture_output=True, env=common.worker_env())
    workdir = f'--workdir={root}/run'
    results = {'load_average_before': common.load_average()}
    results['fresh'] = _time_to_first_step(base + [workdir])
    results['restart_with_cache'] = _time_to_first_step(base + [workdir])
    results['restart_without_cache'] = _time_to_first_step(
        base + [workdir, '--config.compilation_cache_dir='])
    results['load_average_after'] = common.load_average()
    results['machine'] = common.machine()
    common.write_json(args.out, results)
    for name in ('fresh', 'restart_with_cache', 'restart_without_cache'):
        r = results[name]
        print(f'{name:22s} {r["seconds_to_first_step"]:6.1f} s to step {r["first_step"]}')
    print(f'load average before {results["load_average_before"]}, after '
          f'{results["load_average_after"]}')


if __name__ == '__main__':
    main()
