"""The helper a trial imports to report metrics and read its parameters:
``from mercato_trial import params, report``.

It only prints one JSON object per call on stdout, which is all any executor looks
for (see node.provider.executor), so a trial can just as well print the JSON itself. This
module imports nothing from Mercato: it must load inside the sandbox, where only
the interpreter and this package's directory are visible.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any

#: Set for every sweep trial: the path (relative to the trial's working directory) of a
#: JSON object holding its parameters, whatever its command passes on the command line.
PARAMS_FILE_ENV = "MERCATO_PARAMS_FILE"


def params() -> dict[str, Any]:
    """The trial's parameters (nested parameters as dicts), as W&B's ``wandb.config``.

    Read from the file ``$MERCATO_PARAMS_FILE`` names; raises KeyError outside a sweep.
    """
    with open(os.environ[PARAMS_FILE_ENV], encoding="utf-8") as f:
        data = json.load(f)
    if not isinstance(data, dict):
        raise ValueError(f"{os.environ[PARAMS_FILE_ENV]} does not hold a JSON object")
    return data


def report(**metrics: object) -> None:
    """Report metrics, e.g. ``report(step=3, loss=0.25)``: one JSON line, flushed at once.

    Finite int and float values become the trial's metrics (the last value of each
    name wins); the whole record, other values included, joins the metric history.
    """
    line = json.dumps(metrics, separators=(",", ":"), default=_plain)
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def _plain(value: object) -> object:
    # numpy and torch scalars are not JSON types but have .item(), which gives the
    # Python number; anything else is reported as text rather than crashing the trial.
    item = getattr(value, "item", None)
    if callable(item):
        try:
            return item()
        except (TypeError, ValueError):
            pass
    return str(value)
