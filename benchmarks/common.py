"""Helpers shared by the benchmark scripts: timing, memory, load, machine info, output, workers.

Imports nothing heavy at module level (jax, torch and lmoe_jax are imported inside the functions
that need them), so a parent process that only orchestrates workers never initialises a device.
Every run of a benchmark case happens in a worker subprocess (:func:`run_worker`), which prints
one ``RESULT <json>`` line (:func:`worker_result`): compile caches, allocators and memory
high-water marks then never leak from one case into the next.
"""
from __future__ import annotations

import json
import os
import platform
import re
import signal
import statistics
import subprocess
import sys
import time
from typing import Any, Callable

from etils import epath

HERE = epath.Path(__file__).resolve().parent
ROOT = HERE.parent
if os.fspath(ROOT) not in sys.path:  # the scripts build on lmoe_jax from this checkout
    sys.path.insert(0, os.fspath(ROOT))
RESULT_PREFIX = 'RESULT '
OOM_MARKERS = ('RESOURCE_EXHAUSTED', 'out of memory', 'OutOfMemoryError', 'Out of memory')


# --------------------------------------------------------------------------------------------------
# The library's own facts
# --------------------------------------------------------------------------------------------------

class Settings(dict):
    """A dict read by attribute too: what ``lmoe_jax.train.make_optimizer`` needs from a config,
    without ml_collections (absent on the GPU machine)."""

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None


#: The optimiser of every benchmark: the trainer's SGD-Nesterov defaults (configs/default.py).
OPTIMIZER = Settings(optimizer='sgd', learning_rate=1e-3, end_learning_rate=1e-6, warmup_steps=0,
                     momentum=0.9, nesterov=True, weight_decay=1e-5, grad_clip_norm=0.0)


def forward_passes(method_name: str) -> int:
    """Images forwarded per step / B: the ID batch, plus the outliers and the mixed batch when
    the method's objective needs their logits (``lmoe_jax.losses.Method``)."""
    from lmoe_jax import losses
    method = losses.get_method(method_name)
    return 1 + int(method.needs_ood) + int(method.needs_mix)


def resnet_forward_flops(name: str, image_size: int, num_classes: int, width: int | None = None,
                         channels: int = 3) -> int:
    """Analytic FLOPs (2 x multiply-adds) of one image's forward pass: convolutions and fc.

    Counted from ``lmoe_jax.models.resnet.ARCHITECTURES`` with torchvision's padding arithmetic.
    BatchNorm, ReLU, pooling and the residual adds (under 1% of a ResNet-50) are left out, as
    in the usual "4.1 G" figure for ResNet-50, which counts multiply-adds: 8.2 GFLOPs here.
    """
    from lmoe_jax.models import DEFAULT_WIDTH
    from lmoe_jax.models.resnet import ARCHITECTURES
    block, stages, stem = ARCHITECTURES[name]
    width = DEFAULT_WIDTH[name] if width is None else width

    def out(size, k, s):
        return (size + 2 * (k // 2) - k) // s + 1

    def conv(size, k, s, cin, cout):  # -> (MACs, output size)
        o = out(size, k, s)
        return o * o * k * k * cin * cout, o

    if stem == 'imagenet':
        macs, size = conv(image_size, 7, 2, channels, width)
        size = out(size, 3, 2)  # maxpool 3x3/2, padding 1
    else:
        macs, size = conv(image_size, 3, 1, channels, width)
    cin = width
    for i, blocks in enumerate(stages):
        f = width * 2 ** i
        cout = f * block.expansion
        for j in range(blocks):
            s = 2 if i > 0 and j == 0 else 1
            if block.expansion == 4:  # Bottleneck: 1x1, 3x3 (stride), 1x1
                m1, _ = conv(size, 1, 1, cin, f)
                m2, o = conv(size, 3, s, f, f)
                m3, _ = conv(o, 1, 1, f, cout)
                m = m1 + m2 + m3
            else:  # BasicBlock: 3x3 (stride), 3x3
                m1, o = conv(size, 3, s, cin, f)
                m2, _ = conv(o, 3, 1, f, f)
                m = m1 + m2
            if s != 1 or cin != cout:
                m += conv(size, 1, s, cin, cout)[0]
            macs, size, cin = macs + m, o, cout
    macs += cin * num_classes
    return 2 * macs


# --------------------------------------------------------------------------------------------------
# Timing and memory
# --------------------------------------------------------------------------------------------------

def time_steps(step: Callable[[], Any], steps: int,
               wait: Callable[[Any], Any]) -> tuple[list, list]:
    """Wall and process-CPU seconds of ``steps`` calls of ``step``, each waited for by ``wait``."""
    times, cpu_times = [], []
    for _ in range(steps):
        t0, c0 = time.perf_counter(), time.process_time()
        wait(step())
        times.append(time.perf_counter() - t0)
        cpu_times.append(time.process_time() - c0)
    return times, cpu_times


def summarize(times: list[float], batch_size: int, passes: int, cpu_times: list[float]) -> dict:
    """Step statistics; ``cpu_s_median`` (process CPU time per step) is steadier on a busy host."""
    median = statistics.median(times)
    return {
        'cpu_s_median': statistics.median(cpu_times), 'cpu_s_all': cpu_times,
        'step_s_median': median, 'step_s_min': min(times), 'step_s_max': max(times),
        'step_s_all': times, 'id_img_s': batch_size / median,
        'fwd_img_s': batch_size * passes / median, 'passes': passes,
    }


def _proc_status_kib(field: str) -> int | None:
    try:
        text = epath.Path('/proc/self/status').read_text()
    except OSError:
        return None
    match = re.search(rf'^{field}:\s+(\d+) kB', text, re.M)
    return int(match.group(1)) if match else None


def reset_rss_peak() -> bool:
    """Reset the kernel's RSS high-water mark (VmHWM) of this process; False where unsupported."""
    try:
        epath.Path('/proc/self/clear_refs').write_text('5')
        return True
    except OSError:
        return False


def rss_mib() -> float | None:
    kib = _proc_status_kib('VmRSS')
    return None if kib is None else kib / 1024


def rss_peak_mib() -> float | None:
    kib = _proc_status_kib('VmHWM')
    return None if kib is None else kib / 1024


# --------------------------------------------------------------------------------------------------
# The machine
# --------------------------------------------------------------------------------------------------

def load_average() -> list[float]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return []


def machine() -> dict:
    """Platform, Python, CPUs available to this process and the CPU model."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else os.cpu_count()
    info = {'platform': platform.platform(), 'python': platform.python_version(),
            'cpus_available': cpus}
    try:
        lscpu = subprocess.run(['lscpu'], capture_output=True, text=True).stdout
        info['cpu_model'] = re.search(r'Model name:\s+(.*)', lscpu).group(1).strip()
    except (OSError, AttributeError):
        pass
    return info


# --------------------------------------------------------------------------------------------------
# Output
# --------------------------------------------------------------------------------------------------

def write_json(path: str | os.PathLike, obj: Any) -> epath.Path:
    """``obj`` as indented JSON at ``path`` (parent folders created); returns the path."""
    path = epath.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=1, default=str) + '\n')
    return path


def write_text(path: str | os.PathLike, text: str) -> epath.Path:
    path = epath.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def fmt(value: Any, spec: str) -> str:
    """``format(value, spec)``, or '' for a missing value (table cells)."""
    return '' if value is None else format(value, spec)


# --------------------------------------------------------------------------------------------------
# Worker subprocesses
# --------------------------------------------------------------------------------------------------

def worker_result(result: dict) -> None:
    """What a worker prints as its last line for :func:`run_worker`."""
    print(RESULT_PREFIX + json.dumps(result, default=str), flush=True)


def worker_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """This process's environment, the repository and benchmarks/ on PYTHONPATH, plus ``extra``."""
    env = dict(os.environ)
    env.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
    env['PYTHONPATH'] = os.pathsep.join(
        [os.fspath(ROOT), os.fspath(HERE)] + [p for p in [env.get('PYTHONPATH')] if p])
    env.update(extra or {})
    return env


def run_worker(script: str | os.PathLike, spec: dict, timeout_s: float,
               env: dict[str, str] | None = None) -> dict:
    """Run ``script --_worker <spec>`` in a new process group and return ``{**spec, **RESULT}``.

    On failure the result has ``error`` (the last lines of the output) and ``oom`` (an
    out-of-memory message was among them); past ``timeout_s`` the whole process group is
    killed (torch.compile starts helper processes) and ``timed_out`` is set.
    """
    cmd = [sys.executable, os.fspath(script), '--_worker', json.dumps(spec)]
    load_before, started = load_average(), time.perf_counter()
    proc = subprocess.Popen(cmd, env=env or worker_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=max(timeout_s, 1))
    except subprocess.TimeoutExpired:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.communicate()
        return {**spec, 'error': f'timed out after {timeout_s:.0f} s', 'timed_out': True,
                'wall_s': time.perf_counter() - started, 'load_before': load_before}
    wall_s = time.perf_counter() - started
    lines = [ln for ln in stdout.splitlines() if ln.startswith(RESULT_PREFIX)]
    if proc.returncode or not lines:
        output = (stderr or '') + '\n' + (stdout or '')
        tail = [ln for ln in output.strip().splitlines() if ln.strip()][-5:]
        return {**spec, 'error': ' | '.join(tail) or f'exit status {proc.returncode}',
                'oom': any(m in output for m in OOM_MARKERS), 'wall_s': wall_s,
                'load_before': load_before}
    result = json.loads(lines[-1][len(RESULT_PREFIX):])
    return {**spec, **result, 'wall_s': wall_s, 'load_before': load_before,
            'load_after': load_average()}
