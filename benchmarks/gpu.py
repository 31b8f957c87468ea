"""bf16 ResNet-50 training on one GPU: lmoe_jax's train step vs PyTorch eager and torch.compile.

One run on one GPU times the step of baseline, MixOE (``mixoe_mixup``) and LMoE at 224 px:

* ``jax``: ``lmoe_jax.parallel.jit_train_step`` (the trainer's step; ``jax_step.py``), ResNet-50
  from ``lmoe_jax.models`` with ``dtype='bfloat16'`` (float32 parameters, bf16 compute);
* ``torch-eager`` / ``torch-compile``: torchvision's resnet50 under ``torch.autocast(bfloat16)``,
  channels_last, cudnn.benchmark, the same objective, SGD and one forward over the
  concatenation of the 1-3 image sets like the JAX step (``torch_reference.py``,
  ``forward='concat'``); ``torch-compile`` wraps the model in ``torch.compile``.

Batch sizes: B=64 ID images per step (+64 outliers; 64/128/192 images forwarded), then the
largest batch that fits, by doubling B from 64 on LMoE (the method that forwards the most
images) for ``jax`` and ``torch-eager`` until a step runs out of memory, the peak predicted from
the last two sizes exceeds the device memory, or ``--max_batch``; the other methods (and
torch.compile, at torch-eager's size) are then timed at that B. Every case runs in its own
process (fresh allocator and memory high-water mark).

Reported per case: ID images/s and images forwarded/s, median step time, peak device memory
(jax ``memory_stats()['peak_bytes_in_use']``, torch ``max_memory_allocated``), compile time
(jax: lower + compile; torch.compile: first step minus the median step), and the achieved
TFLOP/s and fraction of the GPU's bf16 dense peak, counting 3 x the analytic forward FLOPs per
image forwarded (``common.resnet_forward_flops``: 8.2 GFLOPs = 2 x 4.1 G multiply-adds for
ResNet-50 at 224 px); XLA's own count (``Lowered.cost_analysis()``) is reported beside it.

A time guard keeps the run under ``--budget_s`` (default 450 s): the cases run in order of
importance, a case starts only with ``--min_case_s`` left, and whatever does not fit is listed
as skipped. The JSON and the markdown table are rewritten after every case.

Imports jax, flax, optax, numpy, etils and lmoe_jax's models / losses / train / parallel, and
torch + torchvision when installed (else the PyTorch rows say 'skipped'); not TensorFlow, TFDS,
CLU or ml_collections.

    python benchmarks/gpu.py --out=benchmarks/results/gpu_h200          # one GPU, < 8 min
    python benchmarks/gpu.py --smoke --out=/tmp/gpu_smoke               # CPU, tiny, < 1 min
"""
from __future__ import annotations

import argparse
import importlib.util
import sys
import time
from typing import Callable

from etils import epath

import common
import worker

METHODS = ('lmoe', 'mixoe_mixup', 'baseline')  # in order of importance
SEARCH_METHOD = 'lmoe'
RUNNERS = {
    'jax': dict(framework='jax', variant='jit'),
    'torch-eager': dict(framework='torch', variant='eager', compile=False),
    'torch-compile': dict(framework='torch', variant='compile', compile=True),
}
SEARCH_RUNNERS = ('jax', 'torch-eager')  # torch.compile reuses torch-eager's largest batch

FULL = dict(model='resnet50', width=None, image_size=224, channels=3, num_classes=100,
            dtype='bfloat16', batch_size=64, steps=20, warmup=3, search_steps=5, search_warmup=2,
            max_batch=1024, budget_s=450.0, min_case_s=30.0, device='cuda',
            memory_format='channels_last', platform=None)
# The smoke run checks the script, not the numbers: two methods (one and three forward passes)
# and no search (--max_batch=16 adds one search step) keep it near 30 s on 2 busy CPU cores.
SMOKE = dict(model='small_cnn', width=None, image_size=32, channels=3, num_classes=10,
             dtype='bfloat16', batch_size=8, steps=2, warmup=1, search_steps=2, search_warmup=1,
             max_batch=8, budget_s=240.0, min_case_s=3.0, device='cpu',
             memory_format='contiguous', platform='cpu')
SMOKE_METHODS = ('lmoe', 'baseline')

#: bf16 dense Tensor Core peaks from NVIDIA's datasheets (the doubled figures assume 2:4
#: sparsity); the first name contained in the device name wins.
BF16_DENSE_PEAK_TFLOPS = (('H200 NVL', 835.6), ('H200', 989.4), ('H100 NVL', 835.6),
                          ('H100 PCIe', 756.5), ('H100', 989.4), ('A100', 312.0))
FIT_MARGIN = 0.97  # a predicted peak above this fraction of the device memory does not fit


# --------------------------------------------------------------------------------------------------
# The plan: which cases, in which order, within the time budget
# --------------------------------------------------------------------------------------------------

def unavailable_runners(runners) -> dict[str, str]:
    """Runner -> why it cannot run here (PyTorch not installed)."""
    missing = [m for m in ('torch', 'torchvision') if importlib.util.find_spec(m) is None]
    reason = f"skipped: {' and '.join(missing)} not importable" if missing else None
    return {r: reason for r in runners if reason and RUNNERS[r]['framework'] == 'torch'}


def _ok(result: dict | None) -> bool:
    return bool(result) and result.get('status') == 'ok'


def predicted_peak_mib(points: list[tuple[int, float]], batch: int) -> float | None:
    """Peak memory at ``batch`` extrapolated linearly from the last two (batch, peak) points."""
    if len(points) < 2:
        return None
    (b1, p1), (b2, p2) = points[-2], points[-1]
    return p2 + (p2 - p1) / (b2 - b1) * (batch - b2)


def benchmark(opts: dict, run_case: Callable[[dict, float], dict], *, runners, methods,
              search: bool = True, unavailable: dict[str, str] | None = None,
              clock: Callable[[], float] = time.monotonic,
              on_result: Callable[[list], None] | None = None) -> dict:
    """Run the cases in order of importance within ``opts['budget_s']``.

    1. B = ``batch_size``: each method (LMoE first) on each runner;
    2. doubling search on LMoE for ``jax`` and ``torch-eager``;
    3. torch.compile at torch-eager's largest batch, then the other methods at each runner's.
    ``run_case(spec, timeout_s)`` returns the worker's result (``run_worker``'s fields).
    """
    unavailable = unavailable or {}
    deadline = clock() + opts['budget_s']
    results: list[dict] = []
    case_keys = ('model', 'width', 'image_size', 'channels', 'num_classes', 'dtype', 'device',
                 'memory_format', 'platform')
    base = {k: opts[k] for k in case_keys}

    def run(runner: str, method: str, batch: int, purpose: str) -> dict:
        search_case = purpose == 'search'
        spec = dict(base, **RUNNERS[runner], runner=runner, method=method, batch_size=batch,
                    purpose=purpose, forward='concat', num_devices=1,
                    steps=opts['search_steps' if search_case else 'steps'],
                    warmup=opts['search_warmup' if search_case else 'warmup'])
        left = deadline - clock()
        if runner in unavailable:
            result = dict(spec, status='skipped', reason=unavailable[runner])
        elif left < opts['min_case_s']:
            result = dict(spec, status='skipped',
                          reason=f'skipped: time budget spent ({max(left, 0):.0f} s left)')
        else:
            result = run_case(spec, left)
            if result.get('timed_out'):
                result.update(status='cut', reason=f'cut by the time guard after {left:.0f} s')
            elif 'error' in result:
                result.update(status='oom' if result.get('oom') else 'error')
            else:
                result['status'] = 'ok'
        results.append(result)
        if on_result:
            on_result(results)
        return result

    b0 = opts['batch_size']
    first = {}
    for method in methods:  # 1. the fixed batch
        for runner in runners:
            first[runner, method] = run(runner, method, b0, 'fixed')

    largest, stopped = {}, {}
    for runner in [r for r in SEARCH_RUNNERS if r in runners] if search else []:
        ok = first.get((runner, SEARCH_METHOD))  # 2. the doubling search on LMoE
        if not _ok(ok):
            stopped[runner] = f'no {SEARCH_METHOD} result at B={b0}'
            continue
        points, batch = [(b0, ok.get('peak_mib'))], b0
        while True:
            nxt = batch * 2
            if nxt > opts['max_batch']:
                stopped[runner] = f'--max_batch={opts["max_batch"]} reached'
                break
            limit = ok.get('memory_limit_mib')
            guess = predicted_peak_mib([p for p in points if p[1] is not None], nxt)
            if guess is not None and limit and guess > FIT_MARGIN * limit:
                stopped[runner] = (f'B={nxt} predicted to need {guess / 1024:.1f} GiB of '
                                   f'{limit / 1024:.1f} GiB')
                break
            result = run(runner, SEARCH_METHOD, nxt, 'search')
            if not _ok(result):
                why = result.get('reason') or f"{result['status']}: {result.get('error', '')[:120]}"
                stopped[runner] = f'B={nxt}: {why}'
                break
            ok, batch = result, nxt
            points.append((nxt, result.get('peak_mib')))
        if batch > b0:
            largest[runner] = batch

    if 'torch-eager' in largest and 'torch-compile' in runners:  # 3. the largest batches
        largest['torch-compile'] = largest['torch-eager']
        run('torch-compile', SEARCH_METHOD, largest['torch-compile'], 'largest')
    for method in [m for m in methods if m != SEARCH_METHOD]:
        for runner in runners:
            if runner in largest:
                run(runner, method, largest[runner], 'largest')
    return {'results': results, 'largest_batch': largest, 'search_stopped': stopped}


# --------------------------------------------------------------------------------------------------
# Derived numbers and the report
# --------------------------------------------------------------------------------------------------

def peak_tflops(device: str | None, override: float | None) -> tuple[float | None, str]:
    """The bf16 dense peak of ``device`` and where the number comes from."""
    if override:
        return override, f'--peak_tflops={override:g}'
    for name, value in BF16_DENSE_PEAK_TFLOPS:
        if device and name.lower() in device.lower():
            return value, f'NVIDIA datasheet, {name} bf16 dense (no sparsity): {value:g} TFLOP/s'
    return None, f'unknown for device {device!r} (pass --peak_tflops)'


def add_throughput(result: dict, fwd_flops: int, peak: float | None) -> dict:
    """Achieved TFLOP/s (3 x forward FLOPs per image forwarded) and its fraction of ``peak``."""
    if result.get('status') != 'ok':
        return result
    flops_step = 3 * fwd_flops * result['batch_size'] * result['passes']
    result['model_flops_per_step'] = flops_step
    result['tflops'] = flops_step / result['step_s_median'] / 1e12
    result['peak_fraction'] = result['tflops'] / peak if peak else None
    if result.get('xla_flops_lowered'):
        result['xla_flops_over_analytic'] = result['xla_flops_lowered'] / flops_step
    return result


def _label(r: dict) -> str:
    return f"{r['runner']} {r['method']} B={r['batch_size']}"


def report(run: dict, info: dict) -> str:
    """The markdown: one row per case, then ratios, the search and what was skipped."""
    rows = run['results']
    head = ('| runner | method | B | case | images fwd / step | step ms (median) | ID img/s '
            '| fwd img/s | peak GiB | compile s | TFLOP/s | % of bf16 peak | status |')
    lines = [f"# {info['title']}", '', f"Device: {info.get('device') or 'n/a'}; "
             f"peak: {info['peak_source']}; FLOPs: {info['flops_basis']}.", '', head,
             '|' + '---|' * (head.count('|') - 1)]
    for r in rows:
        ok = r.get('status') == 'ok'
        note = r.get('reason') or r.get('status', '')
        if r.get('error') and not r.get('reason'):
            note += f": {r['error'][:100]}"
        lines.append(
            f"| {r['runner']} | {r['method']} | {r['batch_size']} | {r['purpose']} | "
            f"{r['batch_size'] * r['passes'] if ok else ''} | "
            f"{common.fmt(r.get('step_s_median') and 1e3 * r['step_s_median'], '.1f')} | "
            f"{common.fmt(r.get('id_img_s'), '.0f')} | {common.fmt(r.get('fwd_img_s'), '.0f')} | "
            f"{common.fmt(r.get('peak_mib') and r['peak_mib'] / 1024, '.2f')} | "
            f"{common.fmt(r.get('compile_s'), '.1f')} | {common.fmt(r.get('tflops'), '.1f')} | "
            f"{common.fmt(r.get('peak_fraction') and 100 * r['peak_fraction'], '.1f')} | "
            f"{note.replace('|', '/')} |")
    lines += [''] + summary(run)
    return '\n'.join(lines) + '\n'


def summary(run: dict) -> list[str]:
    """Speed ratios between runners and methods at the same B, the search, the skipped cases."""
    ok = [r for r in run['results'] if r.get('status') == 'ok']
    pick = lambda runner, method, b: next(  # noqa: E731
        (r for r in ok if (r['runner'], r['method'], r['batch_size']) == (runner, method, b)), None)
    out = []
    for b in sorted({r['batch_size'] for r in ok}):
        for method in METHODS:
            j = pick('jax', method, b)
            for other in ('torch-eager', 'torch-compile'):
                t = pick(other, method, b)
                if j and t:
                    out.append(f"- B={b} {method}: JAX / {other} speed = "
                               f"{t['step_s_median'] / j['step_s_median']:.2f} "
                               f"({1e3 * j['step_s_median']:.1f} ms vs "
                               f"{1e3 * t['step_s_median']:.1f} ms)")
        for runner in RUNNERS:
            lm, mx = pick(runner, 'lmoe', b), pick(runner, 'mixoe_mixup', b)
            if lm and mx:
                out.append(f"- B={b} {runner}: LMoE / MixOE step time = "
                           f"{lm['step_s_median'] / mx['step_s_median']:.2f}x")
    for runner, why in run['search_stopped'].items():
        found = run['largest_batch'].get(runner)
        found = f'B={found}' if found else 'none above the fixed batch'
        out.append(f'- largest LMoE batch, {runner}: {found} (search stopped: {why})')
    skipped = [r for r in run['results'] if r.get('status') in ('skipped', 'cut')]
    if skipped:
        out.append(f"- not measured ({len(skipped)}): " + '; '.join(
            f"{_label(r)} ({r['reason']})" for r in skipped))
    return out


# --------------------------------------------------------------------------------------------------
# Entry points
# --------------------------------------------------------------------------------------------------

def worker_env(spec: dict) -> dict[str, str]:
    extra = {}
    if spec['framework'] == 'torch':
        extra['JAX_PLATFORMS'] = 'cpu'  # it reads lmoe_jax.losses: keep JAX off the GPU
    elif spec.get('platform') == 'cpu':
        extra['JAX_PLATFORMS'] = 'cpu'
    env = common.worker_env(extra)
    if spec['framework'] == 'jax' and spec.get('platform') != 'cpu':
        # XLA preallocates 75% of the GPU by default; give it what PyTorch can use too.
        env.setdefault('XLA_PYTHON_CLIENT_MEM_FRACTION', '0.92')
    flags = env.get('XLA_FLAGS', '')
    if spec['framework'] == 'jax' and spec.get('platform') == 'cpu' and \
            'xla_backend_optimization_level' not in flags:  # the CPU smoke run: compile fast
        env['XLA_FLAGS'] = (flags + ' --xla_backend_optimization_level=0').strip()
    return env


def run_case(spec: dict, timeout_s: float) -> dict:
    result = common.run_worker(__file__, spec, timeout_s, worker_env(spec))
    status = (f"{1e3 * result['step_s_median']:.1f} ms/step, {result['id_img_s']:.0f} ID img/s"
              if 'step_s_median' in result else result.get('error', '')[:160])
    print(f"{spec['runner']:13s} {spec['method']:12s} B={spec['batch_size']:<5d} "
          f"({spec['purpose']}): {status}", flush=True)
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--out', default=None, help='folder for gpu.json and gpu.md (required)')
    parser.add_argument('--smoke', action='store_true',
                        help='CPU, small_cnn at 32 px, B=8, 2 steps, LMoE and baseline, no search: '
                             'checks the script, measures nothing')
    parser.add_argument('--runners', default=','.join(RUNNERS))
    parser.add_argument('--methods', default=None,
                        help=f"default {','.join(METHODS)} "
                             f"({','.join(SMOKE_METHODS)} with --smoke)")
    parser.add_argument('--no_search', action='store_true', help='skip the largest-batch search')
    parser.add_argument('--budget_s', type=float, default=None, help='time guard (default 450 s)')
    parser.add_argument('--batch_size', type=int, default=None, help='the fixed B (default 64)')
    parser.add_argument('--max_batch', type=int, default=None,
                        help='search cap (default 1024; 8 = no search with --smoke)')
    parser.add_argument('--steps', type=int, default=None, help='timed steps (default 20)')
    parser.add_argument('--peak_tflops', type=float, default=None,
                        help='bf16 dense peak of the device (default: from its name)')
    parser.add_argument('--_worker', default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args._worker:
        worker.serve(args._worker)
        return 0

    if not args.out:
        parser.error('--out=FOLDER is required')
    opts = dict(SMOKE if args.smoke else FULL)
    for key in ('budget_s', 'batch_size', 'max_batch', 'steps'):
        if getattr(args, key) is not None:
            opts[key] = getattr(args, key)
    runners = [r for r in args.runners.split(',') if r]
    methods = [m for m in (args.methods or ','.join(SMOKE_METHODS if args.smoke else METHODS))
               .split(',') if m]
    for name, given, valid in (('runner', runners, RUNNERS), ('method', methods, METHODS)):
        bad = [g for g in given if g not in valid]
        if bad:
            parser.error(f"unknown {name}(s) {bad}; valid: {', '.join(valid)}")
    fwd_flops = common.resnet_forward_flops(opts['model'], opts['image_size'],
                                            opts['num_classes'], opts['width'], opts['channels'])
    info = {'title': ('Smoke run (CPU, tiny sizes: not a measurement)' if args.smoke else
                      f"bf16 {opts['model']} {opts['image_size']} px train step, one GPU"),
            'command': ' '.join(['python'] + sys.argv), 'options': opts, 'runners': runners,
            'methods': methods, 'machine': common.machine(),
            'started': time.strftime('%Y-%m-%d %H:%M:%S'),
            'flops_basis': (f"analytic, 3 x {fwd_flops / 1e9:.2f} GFLOPs (forward, 2 x "
                            f"multiply-adds) per image forwarded"),
            'forward_flops_per_image': fwd_flops, 'finished': False}
    out = epath.Path(args.out)
    started = time.monotonic()

    def save(run: dict) -> None:
        """Derived numbers, then gpu.json and gpu.md (after every case: a cut run keeps them)."""
        done = [r for r in run['results'] if r.get('status') == 'ok']
        device = next((r.get('device') for r in done if r['framework'] == 'jax'), None) or \
            next((r.get('device') for r in done), None)
        peak, source = peak_tflops(device, args.peak_tflops)
        if args.smoke:
            peak, source = None, 'none (CPU smoke run)'
        for r in run['results']:
            add_throughput(r, fwd_flops, peak)
        info.update(device=device, peak_tflops=peak, peak_source=source,
                    wall_s=time.monotonic() - started)
        common.write_json(out / 'gpu.json', {'info': info, **run})
        common.write_text(out / 'gpu.md', report(run, info))

    run = benchmark(opts, run_case, runners=runners, methods=methods, search=not args.no_search,
                    unavailable=unavailable_runners(runners),
                    on_result=lambda results: save({'results': results, 'largest_batch': {},
                                                    'search_stopped': {}}))
    info['finished'] = True
    save(run)
    print((out / 'gpu.md').read_text())
    print(f'wrote {out / "gpu.json"} and {out / "gpu.md"} ({time.monotonic() - started:.0f} s)')
    return 0


if __name__ == '__main__':
    sys.exit(main())
