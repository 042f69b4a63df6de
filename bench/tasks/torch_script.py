"""The script of ``bench.tasks.warm --kind cmd``: what ``uses_torch`` does, as a program
(``python bench/tasks/torch_script.py``) printing its result."""

from __future__ import annotations

import json

import torch

print(json.dumps(float(torch.arange(10.0).sum())))
