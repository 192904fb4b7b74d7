"""Validation of a job before it is queued: the config (via `edgerlhf.config`) and the paths it names.

Errors come back as FastAPI-style 422 bodies naming the field, e.g.
`{"detail": [{"loc": ["body", "overrides", "ppo", "batch_size"], "msg": "must be > 0, got -1", "type": "config"}]}`.
A model or data path must be a Hugging Face hub id (`name` or `org/name`, which the job process never
looks up on disk: see `edgerlhf.locations`) or an absolute local path that, after resolving symlinks and
`..`, lies under `settings.allowed_roots` or `settings.data_dir`. A reward function (`ppo.reward_function`)
must be a gold scorer: an import path would run code of the job's choosing on the worker.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from edgerlhf.config import PRESETS, ConfigError, PipelineConfig, load_config, service_problems


MAX_CONFIG_BYTES = 16_384
"""Largest config a job may store, as JSON."""


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


def validate_job(preset: str, overrides: dict[str, Any], roots: list[Path],
                 judge_urls: tuple[str, ...] = ()) -> PipelineConfig:
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
    # Paths under the allowed roots, no import-path reward function, judges the operator lists: the rule the job
    # process checks again.
    errors = [{"loc": ["body", "overrides", *_loc(field)], "type": kind, "msg": message}
              for field, kind, message in service_problems(config, roots, judge_urls)]
    size = len(json.dumps(config.to_dict()))
    if size > MAX_CONFIG_BYTES:  # every job list item once carried it, and a job stores it whole
        errors.append({"loc": ["body", "overrides"], "type": "config",
                       "msg": f"the job's config would take {size:,} bytes as JSON; at most {MAX_CONFIG_BYTES:,} "
                              "(a preset's takes about 3,000)"})
    if errors:
        raise JobInvalid(errors)
    return config
