"""The ``--_worker`` side of :func:`common.run_worker` (train_step.py and gpu.py): one case here.

Its own module so that ``common`` (imported by every case) never imports the cases back.
"""
from __future__ import annotations

import json

import common
import jax_step
import torch_reference

RUNNERS = {'jax': jax_step.run, 'torch': torch_reference.run}


def serve(spec_json: str) -> None:
    """Run the case ``spec_json`` describes in this process and print its ``RESULT`` line."""
    spec = json.loads(spec_json)
    common.worker_result(RUNNERS[spec['framework']](spec))
