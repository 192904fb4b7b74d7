"""The dashboard's side of the data sets: their API calls, labels, and the New job form's choice of a data set per
config section.

Calls go through the one API client (`frontend.api_client`) and read exactly the fields of the backend's data set
schemas (`backend/api/schemas.py`: `DatasetPublic`, `DatasetAdded`, `DatasetPreview`); a missing field raises
`ContractError`. The Data sets page is `app_pages/datasets.py`; what is stored and how a job reads it is
`backend.datasets`.
"""

from __future__ import annotations

import json
from typing import Any

import httpx

from frontend.api_client import ApiClient, _field

FORMATS = ["auto", "preference", "demonstration", "prompt", "unpaired"]
"""`DatasetFormat`: what a data set holds; `auto` detects it from the columns."""
SECTIONS = {"data": "Preference data (`data`)", "sft_data": "SFT demonstrations (`sft_data`)",
            "prompt_data": "Prompts for PPO/GRPO/RLOO and evaluation (`prompt_data`)"}
"""The config sections a job may read a data set into (`JobCreate.datasets`), as the New job form names them."""
UPLOAD_TIMEOUT = httpx.Timeout(600.0, connect=2.0)
"""An upload sends up to 200 MiB and the backend reads it whole; a hub registration downloads the data set."""
PREVIEW_TIMEOUT = httpx.Timeout(300.0, connect=2.0)
"""A first preview reads the data set and may download the model's tokenizer."""
PUBLIC_FIELDS = ("id", "name", "origin", "kind", "conversational", "reason", "rows", "records", "bad_rows",
                 "bad_row_examples", "source", "file_name", "size", "sections", "used_by")
PREVIEW_FIELDS = ("chat_template", "kind", "reason", "rows", "records", "bad_rows", "measured", "prompt_tokens",
                  "answer_tokens", "dropped", "kept", "rows_shown", "problems")


def _checked(data: Any, names: tuple[str, ...], where: str) -> Any:
    for name in names:
        _field(data, name, where)
    return data


def list_datasets(client: ApiClient) -> list[dict[str, Any]]:
    """Every data set (`DatasetsPublic.items`), newest first."""
    items = _field(client.request("GET", "/api/datasets"), "items", "/api/datasets")
    return [_checked(d, PUBLIC_FIELDS, "/api/datasets") for d in items]


def upload(client: ApiClient, file_name: str, content: bytes, name: str | None = None, format: str = "auto",
           columns: dict[str, str] | None = None, skip_bad_rows: bool = False) -> dict[str, Any]:
    """Upload a file (`DatasetAdded`: `duplicate` is true when the same content was stored already)."""
    form: dict[str, str] = {"format": format, "skip_bad_rows": "true" if skip_bad_rows else "false"}
    if name:
        form["name"] = name
    if columns:
        form["columns"] = json.dumps(columns)
    added = client.request("POST", "/api/datasets", files={"file": (file_name, content)}, data=form,
                           timeout=UPLOAD_TIMEOUT)
    return _checked(added, (*PUBLIC_FIELDS, "duplicate"), "POST /api/datasets")


def register_hub(client: ApiClient, hub_id: str, **fields: Any) -> dict[str, Any]:
    """Register a hub data set (`DatasetHubCreate`: `name`, `hub_name`, `data_dir`, `split`, `format`, `columns`)."""
    body = {"hub_id": hub_id, **{k: v for k, v in fields.items() if v not in (None, "")}}
    added = client.request("POST", "/api/datasets/hub", json=body, timeout=UPLOAD_TIMEOUT)
    return _checked(added, (*PUBLIC_FIELDS, "duplicate"), "POST /api/datasets/hub")


def preview(client: ApiClient, dataset_id: int, model: str, limit: int, max_prompt_tokens: int,
            max_response_tokens: int) -> dict[str, Any]:
    """`DatasetPreview`: the first rows as `model` sees them, token-length histograms, what the budgets drop."""
    where = f"/api/datasets/{dataset_id}/preview"
    data = client.request("GET", where, timeout=PREVIEW_TIMEOUT, params={
        "model": model, "limit": limit, "max_prompt_tokens": max_prompt_tokens,
        "max_response_tokens": max_response_tokens})
    return _checked(data, PREVIEW_FIELDS, where)


def delete(client: ApiClient, dataset_id: int) -> None:
    client.request("DELETE", f"/api/datasets/{dataset_id}")


def label(dataset: dict[str, Any]) -> str:
    """A data set in a picker: `#3 my-prefs.jsonl (preference, conversational, 1,000 rows)`."""
    traits = [dataset["kind"], *(["conversational"] if dataset["conversational"] else []),
              f"{dataset['rows']:,} rows"]
    return f"#{dataset['id']} {dataset['name']} ({', '.join(traits)})"


def parse_mapping(text: str) -> dict[str, str] | None:
    """A column mapping typed as JSON (`{"question": "prompt"}`); None when empty; `ValueError` when not an object."""
    if not text.strip():
        return None
    mapping = json.loads(text)
    if not isinstance(mapping, dict):
        raise ValueError('a column mapping is a JSON object, e.g. {"question": "prompt"}')
    return mapping


def tokenizer_choices(presets: dict[str, dict[str, Any]]) -> dict[str, str]:
    """Tokenizer location -> label, one per preset's model (its `model.tokenizer`, else its `model.name_or_path`)."""
    choices: dict[str, str] = {}
    for name, preset in presets.items():
        model = preset["config"]["model"]
        where = model.get("tokenizer") or model["name_or_path"]
        choices.setdefault(where, f"{name}: {where}")
    return choices
