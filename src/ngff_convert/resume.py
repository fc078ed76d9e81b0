"""What an interrupted conversion and its ``--resume`` must agree on."""

from __future__ import annotations

import json
from typing import Any

from . import ConvertError

#: What an interrupted conversion and its --resume must agree on.
RESUME_SETTINGS = ("codec", "codec_config", "ngff", "glass", "chunk", "shard", "mask",
                   "source_sha256", "source_bytes", "jpeg_lattice", "level0")


def changed_settings(old: Any, new: Any, name: str = "") -> list[str]:
    """``"name was X, now Y"`` for each (nested, dotted) setting that differs, so the
    user sees which option to give (a run started before dlwsi's rate control became the
    default resumes with ``--quality``, for example)."""
    if isinstance(old, dict) and isinstance(new, dict):
        return [change for key in sorted(set(old) | set(new), key=str)
                for change in changed_settings(old.get(key), new.get(key),
                                                f"{name}.{key}" if name else str(key))]
    if old == new:
        return []
    return [f"{name} was {_short(old)}, now {_short(new)}"]


def _short(value: Any, limit: int = 40) -> str:
    text = "unset" if value is None else repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def check_same_settings(url: str, old: dict[str, Any], new: dict[str, Any]) -> None:
    """Refuse (one line naming each difference) a --resume whose settings differ from
    the interrupted run's."""
    different = changed_settings({k: _jsonable(old.get(k)) for k in RESUME_SETTINGS},
                                 {k: _jsonable(new[k]) for k in RESUME_SETTINGS})
    if different:
        raise ConvertError(f"{url}: --resume with different settings than the interrupted "
                           f"run: {'; '.join(different)}")


def _jsonable(value: Any) -> Any:
    return json.loads(json.dumps(value, default=str)) if value is not None else None
