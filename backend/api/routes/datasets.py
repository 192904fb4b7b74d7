"""Data sets: upload a file or register a hub id, list them, read one, preview it through a model's tokenizer,
delete it. A job names them by id (`JobCreate.datasets`).

This router speaks HTTP only; what is stored where, how a job reads a data set and what a preview measures is
`backend.datasets`. An upload is `multipart/form-data` (`file`, and optionally `name`, `format`, `columns` as a
JSON object, `skip_bad_rows`) of at most `EDGERLHF_MAX_UPLOAD_BYTES` (200 MiB), counted by the edge as the bytes
arrive (`backend.api.middleware.BodyLimitMiddleware`); every other body keeps the 1 MB limit. Errors: 422 naming
the file, line and column of a bad row (or the field), 413 past the limit, 409 for a delete while a queued or
running job reads the data set. A hub id the hub cannot give (offline, gated, missing) is a 422 naming the field,
with the reason.
"""

from __future__ import annotations

import logging
from typing import Annotated

from fastapi import APIRouter, Depends, File, Form, HTTPException, Query, Response, UploadFile, status

from backend import datasets
from backend.api.deps import SessionDep, SettingsDep
from backend.api.errors import SafeJSONResponse
from backend.api.schemas import (DatasetAdded, DatasetFormat, DatasetHubCreate, DatasetPreview, DatasetPublic,
                                 DatasetsPublic)
from db import datasets as store
from db.models import Dataset
from edgerlhf.config import TOKENS, ConfigError, check_source

logger = logging.getLogger("edgerlhf.backend")

router = APIRouter(prefix="/datasets", tags=["datasets"])

FORM_BYTES = 64 * 1024
"""What an upload's body may hold besides the file (the other fields, the multipart boundaries): the edge lets
`EDGERLHF_MAX_UPLOAD_BYTES` plus this through, and the route holds the file itself to the limit."""

REFUSALS = {409: {"description": "Stored already to be read another way (upload, register), or read by a queued or "
                                 "running job (delete)"},
            413: {"description": "The file is larger than EDGERLHF_MAX_UPLOAD_BYTES"},
            422: {"description": "The file, a row of it (named by file, line and column) or a field is invalid"}}


def _refused(exc: datasets.DatasetRefused) -> SafeJSONResponse:
    """A refusal as the API's errors look: a 422 locates the field, the others carry a message."""
    if exc.status == 422 and exc.loc:
        return SafeJSONResponse({"detail": [{"loc": exc.loc, "msg": exc.message, "type": "dataset"}]}, 422)
    return SafeJSONResponse({"detail": exc.message}, exc.status)


def get_dataset_or_404(dataset_id: int, session: SessionDep) -> Dataset:
    dataset = store.get_dataset(session, dataset_id)
    if dataset is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"data set {dataset_id} not found")
    return dataset


DatasetDep = Annotated[Dataset, Depends(get_dataset_or_404)]
COLUMNS_HELP = 'Column mapping as a JSON object, your name -> the format\'s: {"question": "prompt"}'
SKIP_HELP = ("Store it without its bad rows (counted, shown in the preview, skipped by jobs) instead of refusing it on "
             "the first one")


def _added(session, settings, dataset: Dataset, duplicate: bool, response: Response) -> DatasetAdded:
    if duplicate:
        response.status_code = status.HTTP_200_OK
    public = DatasetPublic.of(dataset, settings.data_dir, datasets.readers(
        dataset, store.active_job_configs(session), settings.data_dir))
    return DatasetAdded(**public.model_dump(), duplicate=duplicate)


@router.post("", status_code=status.HTTP_201_CREATED, response_model=DatasetAdded,
             responses={200: {"model": DatasetAdded, "description": "The same file was stored already: that data set"},
                        **REFUSALS})
def upload_dataset(
    session: SessionDep, settings: SettingsDep, response: Response,
    file: Annotated[UploadFile, File(description="A .jsonl, .json, .csv or .parquet file (each also .gz)")],
    name: Annotated[str | None, Form(min_length=1, max_length=200, description="default: the file name")] = None,
    format: Annotated[DatasetFormat, Form(description="What it holds; auto: detected from its columns")] = "auto",
    columns: Annotated[str | None, Form(max_length=20_000, description=COLUMNS_HELP)] = None,
    skip_bad_rows: Annotated[bool, Form(description=SKIP_HELP)] = False,
):
    """Upload a data set file: stored once per content (the same file again returns the stored data set, 200),
    its format detected (`edgerlhf.formats`). A bad row is a 422 naming the file, line and column, and nothing is
    kept."""
    try:
        if name is not None and "\x00" in name:
            raise datasets.DatasetRefused(422, "contains a NUL character", ["body", "name"])
        mapping = datasets.parse_columns(columns, ["body", "columns"])
        dataset, duplicate = datasets.upload(session, settings, file.file, file.filename, name=name, fmt=format,
                                             columns=mapping, skip_bad_rows=skip_bad_rows)
    except datasets.DatasetRefused as exc:
        return _refused(exc)
    if not duplicate:
        logger.info(f"data set {dataset.id} uploaded: {dataset.path} ({dataset.kind}, {dataset.rows} rows)")
    return _added(session, settings, dataset, duplicate, response)


@router.post("/hub", status_code=status.HTTP_201_CREATED, response_model=DatasetAdded,
             responses={200: {"model": DatasetAdded, "description": "Registered already: that data set"},
                        **REFUSALS})
def register_hub_dataset(body: DatasetHubCreate, session: SessionDep, settings: SettingsDep, response: Response):
    """Register a hub data set (id, configuration `hub_name`, `data_dir`, `split`): read once now to detect its
    format; a job that names it downloads it. The hub offline, or the data set gated or missing: 422 saying so."""
    try:
        check_source("body", body.hub_id, body.format, body.columns, body.data_dir, body.split)
    except ConfigError as exc:
        return SafeJSONResponse({"detail": [{"loc": exc.field.split("."), "msg": exc.message, "type": "config"}]}, 422)
    try:
        mapping = datasets.parse_columns(body.columns, ["body", "columns"])
        dataset, duplicate = datasets.register_hub(
            session, settings, hub_id=body.hub_id, hub_name=body.hub_name, data_dir=body.data_dir, split=body.split,
            fmt=body.format, columns=mapping, name=body.name, skip_bad_rows=body.skip_bad_rows)
    except datasets.DatasetRefused as exc:
        return _refused(exc)
    return _added(session, settings, dataset, duplicate, response)


@router.get("", response_model=DatasetsPublic)
def list_datasets(session: SessionDep, settings: SettingsDep):
    """Every data set, newest first, with the queued or running jobs that read each."""
    jobs = store.active_job_configs(session)
    return DatasetsPublic(items=[DatasetPublic.of(d, settings.data_dir, datasets.readers(d, jobs, settings.data_dir))
                                 for d in store.list_datasets(session)])


@router.get("/{dataset_id}", response_model=DatasetPublic, responses={404: {"description": "No such data set"}})
def get_dataset(dataset: DatasetDep, session: SessionDep, settings: SettingsDep):
    return DatasetPublic.of(dataset, settings.data_dir, datasets.readers(
        dataset, store.active_job_configs(session), settings.data_dir))


@router.get("/{dataset_id}/preview", response_model=DatasetPreview,
            responses={404: {"description": "No such data set"},
                       422: {"description": "The model is outside the allowed roots, has no tokenizer, or cannot be "
                                            "had from the hub; or the data set cannot be read"}})
def preview_dataset(
    dataset: DatasetDep, settings: SettingsDep,
    model: Annotated[str, Query(min_length=1, max_length=500, description="A hub id or a local directory under the "
                                                                          "allowed roots: whose tokenizer renders "
                                                                          "and counts")],
    limit: Annotated[int, Query(ge=1, le=datasets.MAX_PREVIEW_ROWS, description="Rows shown")] = 20,
    max_prompt_tokens: Annotated[int, Query(ge=TOKENS.low, le=TOKENS.high,
                                            description="The budget `data.max_prompt_tokens`")] = 256,
    max_response_tokens: Annotated[int, Query(ge=TOKENS.low, le=TOKENS.high,
                                              description="The budget `data.max_response_tokens`")] = 128,
):
    """The first rows as `model` sees them (its chat template), the token lengths, and what the budgets would drop."""
    try:
        return datasets.preview(dataset, settings, model, limit, max_prompt_tokens, max_response_tokens)
    except datasets.DatasetRefused as exc:
        return _refused(exc)


@router.delete("/{dataset_id}", status_code=status.HTTP_204_NO_CONTENT,
               responses={404: {"description": "No such data set"},
                          409: {"description": "A queued or running job reads it"}})
def delete_dataset(dataset: DatasetDep, session: SessionDep, settings: SettingsDep):
    """Delete a data set and its stored file, unless a queued or running job reads it (409)."""
    try:
        datasets.delete(session, settings, dataset)
    except datasets.DatasetRefused as exc:
        return _refused(exc)
    logger.info(f"data set {dataset.id} deleted")
    return Response(status_code=status.HTTP_204_NO_CONTENT)
