"""Validation of a job before it is queued: the config (via `edgerlhf.config`) and the paths it names.

Errors come back as FastAPI-style 422 bodies naming the field, e.g.
`{"detail": [{"loc": ["body", "overrides", "ppo", "batch_size"], "msg": "must be > 0, got -1", "type": "config"}]}`.
A model or data path must be a Hugging Face hub id (`name` or `org/name`, which the job process never
looks up on disk: see `edgerlhf.locations`) or an absolute local path that, after resolving symlinks and
`..`, lies under `settings.allowed_roots` or `settings.data_dir`. A reward function (`ppo.reward_function`)
must be a gold scorer: an import path would run code of the job's choosing on the worker.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from edgerlhf.config import LOCATION_FIELDS, PRESETS, ConfigError, PipelineConfig, load_config
from edgerlhf.gold import SCORERS
from edgerlhf.locations import is_hub_id, is_local


class JobInvalid(Exception):
    """A job body is invalid; `errors` are FastAPI-style `{"loc", "msg", "type"}` entries."""

    def __init__(self, errors: list[dict[str, Any]]):
        super().__init__("; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in errors))
        self.errors = errors


def _loc(field: str) -> list[str | int]:
    """`sft.target_modules[0]` -> ["sft", "target_modules", 0]."""
    loc: list[str | int] = []
    for part in field.split("."):
        m = re.fullmatch(r"([^\[]*)((?:\[\d+\])*)", part)
        if not m:
            loc.append(part)
            continue
        if m.group(1):
            loc.append(m.group(1))
        loc.extend(int(i) for i in re.findall(r"\[(\d+)\]", m.group(2)))
    return loc


def check_location(value: str, roots: list[Path]) -> str | None:
    """None if `value` is a hub id or a local path under one of `roots`; else what is wrong with it."""
    if is_hub_id(value):
        return None
    if "\x00" in value:
        return "contains a NUL byte"
    path = Path(value).expanduser()
    if not is_local(value):
        return ("is neither a hub id ('name' or 'org/name') nor an absolute local path; "
                "give local files as absolute paths")
    resolved = path.resolve()
    for root in roots:
        if resolved.is_relative_to(root.expanduser().resolve()):
            return None
    allowed = ", ".join(str(r) for r in roots)
    return f"local path {value!r} is outside the allowed roots ({allowed}); set EDGERLHF_ALLOWED_ROOTS to allow it"


def validate_job(preset: str, overrides: dict[str, Any], roots: list[Path]) -> PipelineConfig:
    """The job's full config, or `JobInvalid` naming the first bad field."""
    if preset not in PRESETS:
        raise JobInvalid([{"loc": ["body", "preset"], "type": "preset",
                           "msg": f"unknown preset {preset!r}; choose from {sorted(PRESETS)}"}])
    if "preset" in overrides:
        raise JobInvalid([{"loc": ["body", "overrides", "preset"], "type": "config",
                           "msg": "set the preset with the top-level 'preset' field"}])
    try:
        config = load_config(preset, overrides)
    except ConfigError as exc:
        raise JobInvalid([{"loc": ["body", "overrides", *_loc(exc.field)], "type": "config", "msg": exc.message}])
    errors = []
    for section, name in LOCATION_FIELDS:
        value = getattr(getattr(config, section), name)
        if value is None:
            continue
        problem = check_location(value, roots)
        if problem:
            errors.append({"loc": ["body", "overrides", section, name], "type": "path", "msg": problem})
    function = config.ppo.reward_function
    if function is not None and function not in SCORERS:
        # An import path runs that module's code on the worker: only the command line and Python take one.
        errors.append({"loc": ["body", "overrides", "ppo", "reward_function"], "type": "config",
                       "msg": f"a job may name a gold scorer ({sorted(SCORERS)}); a Python import path like "
                              f"{function!r} is taken from the command line only"})
    if errors:
        raise JobInvalid(errors)
    return config
