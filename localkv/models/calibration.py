"""Options fitted to a model by ``localkv eval --calibrate``, kept under localkv's cache directory by model and
policy: ``$LOCALKV_HOME/calibration/<model file>-<hash of its path>.json`` holds ``{policy: {option: value}}``.

The engine reads them as the defaults of the policy it runs (`options`); options the user gives win. A policy
says what it fits (`Policy.calibrate`); nothing here names one.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from ..errors import UserError
from .hub import home


def path_for(source: Path) -> Path:
    """The calibration file of the model at ``source`` (a GGUF file or an HF directory)."""
    source = Path(source).expanduser().resolve()
    digest = hashlib.sha1(str(source).encode()).hexdigest()[:12]
    return home() / "calibration" / f"{source.name}-{digest}.json"


def _read(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as e:
        raise UserError(f"{path}: unreadable calibration ({e}); delete it or run `localkv eval --calibrate` "
                        f"again") from None
    return data if isinstance(data, dict) else {}


def options(source: Path | None, policy: str) -> dict:
    """The calibrated options of ``policy`` for the model at ``source`` ({} when none were stored)."""
    if source is None or not Path(source).exists():
        return {}
    return dict(_read(path_for(source)).get(policy, {}))


def save(source: Path, policy: str, fitted: dict) -> Path:
    """Store ``fitted`` as the calibrated options of ``policy`` for the model at ``source``; returns the file.
    Written to a temporary file and renamed, so a crash leaves the previous calibration."""
    path = path_for(source)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = _read(path)
    data[policy] = fitted
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=1) + "\n")
    os.replace(tmp, path)
    return path
