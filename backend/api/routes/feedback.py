"""Feedback from chat: a thumb and/or a better answer about one reply, stored as the person's data, and made into a
data set a job can read.

    POST   /api/feedback                 store feedback about a reply (201); 422 naming the field
    GET    /api/feedback                 feedback, newest first (paged; by model, rating, with a better answer)
    GET    /api/feedback/{id}            one
    DELETE /api/feedback/{id}            delete one (204): later snapshots leave it out, earlier ones keep it
    POST   /api/feedback/snapshot        the matching feedback as a data set (unpaired thumbs, demonstrations or
                                         preference pairs), each record naming its `feedback_id`

A snapshot is an upload of its records (`backend.datasets.upload`): stored once per content, immutable, listed on the
Data sets page and read by a job like any data set (`JobCreate.datasets`). What the rows become is `db.feedback`.
"""

from __future__ import annotations

import io
import json
import logging
from datetime import datetime
from typing import Annotated, Any, Literal

from fastapi import APIRouter, HTTPException, Query, Response, status
from pydantic import BaseModel, ConfigDict, Field, model_validator

from backend import datasets
from backend.api.deps import RowOffset, SessionDep, SettingsDep
from backend.api.errors import SafeJSONResponse
from backend.api.schemas import DatasetAdded, DatasetPublic, NoNul
from db import datasets as store
from db import feedback
from db.models import Dataset, Feedback

logger = logging.getLogger("edgerlhf.backend")

router = APIRouter(prefix="/feedback", tags=["feedback"])

MAX_TEXT = 20_000
"""Characters of a message, a reply or a better answer."""


class Message(BaseModel):
    model_config = ConfigDict(extra="forbid")

    role: Literal["system", "user", "assistant"]
    content: NoNul = Field(max_length=MAX_TEXT)


class FeedbackCreate(BaseModel):
    """Feedback about one reply: `rating` (1 up, -1 down) and/or `better` (an answer the person wrote)."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [{
        "model": "job-3/ppo", "messages": [{"role": "user", "content": "How do I boil an egg?"}],
        "reply": "Put it in water.", "rating": -1, "better": "Simmer it for 9 minutes, then cool it in cold water.",
        "sampling": {"temperature": 0.7, "top_p": 0.95, "max_tokens": 64}, "completion_id": "chatcmpl-1a2b"}]})

    model: NoNul = Field(min_length=1, max_length=100, description="The chat model that replied (`job-3/ppo`)")
    messages: list[Message] = Field(min_length=1, max_length=64,
                                    description="The conversation up to the reply, the last message the user's")
    reply: NoNul = Field(max_length=MAX_TEXT, description="The reply the feedback is about")
    rating: Literal[1, -1] | None = Field(None, description="1: thumb up, -1: thumb down")
    better: NoNul | None = Field(None, min_length=1, max_length=MAX_TEXT, description="A better answer")
    sampling: dict[str, float | int | None] | None = Field(None, max_length=16,
                                                           description="The reply's sampling settings")
    completion_id: NoNul | None = Field(None, max_length=100, description="The `/v1` reply's `id`")
    author: NoNul | None = Field(None, max_length=100, description="Who gives it")

    @model_validator(mode="after")
    def _something_said(self):
        if self.rating is None and self.better is None:
            raise ValueError("give a rating, a better answer, or both")
        if self.messages[-1].role != "user":
            raise ValueError("messages must end with the user's message the reply answers")
        return self


class FeedbackPublic(BaseModel):
    id: int
    created_at: datetime
    model: str
    completion_id: str | None
    messages: list[dict[str, str]]
    reply: str
    rating: int | None
    better: str | None
    sampling: dict[str, Any] | None
    author: str | None

    @classmethod
    def of(cls, row: Feedback) -> FeedbackPublic:
        return cls(id=row.id, created_at=row.created_at, model=row.model, completion_id=row.completion_id,
                   messages=row.messages, reply=row.reply, rating=row.rating, better=row.better,
                   sampling=row.sampling, author=row.author)


class FeedbacksPublic(BaseModel):
    items: list[FeedbackPublic]
    total: int
    limit: int
    offset: int


class FeedbackSnapshot(BaseModel):
    """Which feedback to make into a data set, and as what."""

    model_config = ConfigDict(extra="forbid")

    kind: Literal["unpaired", "demonstration", "preference"] = Field(
        description="unpaired: every thumb; demonstration: every better answer; preference: better answer ≻ reply")
    model: NoNul | None = Field(None, max_length=100, description="Only feedback about this model (None: any)")
    ids: list[RowOffset] | None = Field(None, max_length=100_000, description="Only these feedback ids (None: all)")
    name: NoNul | None = Field(None, min_length=1, max_length=200, description="The data set's name")


class SnapshotPublic(DatasetAdded):
    feedback_ids: list[int]
    """The feedback the data set holds, one record each (its records also carry `feedback_id`)."""


def _row_or_404(session, feedback_id: int) -> Feedback:
    row = feedback.get_feedback(session, feedback_id)
    if row is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"feedback {feedback_id} not found")
    return row


@router.post("", status_code=status.HTTP_201_CREATED, response_model=FeedbackPublic,
             responses={422: {"description": "A field is invalid (named), or neither a rating nor a better answer"}})
def create_feedback(body: FeedbackCreate, session: SessionDep) -> FeedbackPublic:
    """Store a thumb and/or a better answer about one chat reply."""
    row = feedback.add_feedback(session, **body.model_dump(exclude={"messages"}),
                                messages=[m.model_dump() for m in body.messages])
    return FeedbackPublic.of(row)


@router.get("", response_model=FeedbacksPublic)
def list_feedback(session: SessionDep,
                  model: Annotated[NoNul | None, Query(max_length=100, description="Only about this model")] = None,
                  rating: Annotated[int | None, Query(ge=-1, le=1, description="Only thumbs up (1) or down (-1)")] = None,
                  has_better: Annotated[bool | None, Query(description="Only with (or without) a better answer")] = None,
                  limit: Annotated[int, Query(ge=1, le=500)] = 50,
                  offset: Annotated[RowOffset, Query()] = 0) -> FeedbacksPublic:
    """Feedback, newest first."""
    rows, total = feedback.list_feedback(session, model=model, rating=rating, has_better=has_better, limit=limit,
                                         offset=offset)
    return FeedbacksPublic(items=[FeedbackPublic.of(r) for r in rows], total=total, limit=limit, offset=offset)


@router.get("/{feedback_id}", response_model=FeedbackPublic, responses={404: {"description": "No such feedback"}})
def get_feedback(feedback_id: RowOffset, session: SessionDep) -> FeedbackPublic:
    return FeedbackPublic.of(_row_or_404(session, feedback_id))


@router.delete("/{feedback_id}", status_code=status.HTTP_204_NO_CONTENT,
               responses={404: {"description": "No such feedback"}})
def delete_feedback(feedback_id: RowOffset, session: SessionDep):
    """Delete one: snapshots made later leave it out; a snapshot made before keeps it (a data set is immutable)."""
    feedback.delete_feedback(session, _row_or_404(session, feedback_id))
    return Response(status_code=status.HTTP_204_NO_CONTENT)


@router.post("/snapshot", status_code=status.HTTP_201_CREATED, response_model=SnapshotPublic,
             responses={200: {"model": SnapshotPublic, "description": "The same records were stored already"},
                        422: {"description": "No feedback gives a record of this kind"}})
def snapshot_feedback(body: FeedbackSnapshot, session: SessionDep, settings: SettingsDep, response: Response):
    """The matching feedback as a data set of `kind`: stored like an upload (once per content), named by its
    feedback ids, readable by a job (`JobCreate.datasets`)."""
    try:
        dataset, duplicate, ids = make_snapshot(session, settings, body.kind, model=body.model, ids=body.ids,
                                                name=body.name)
    except NoFeedback as exc:
        return SafeJSONResponse({"detail": [{"loc": ["body", "kind"], "type": "feedback", "msg": str(exc)}]}, 422)
    except datasets.DatasetRefused as exc:
        return SafeJSONResponse({"detail": exc.message}, exc.status)
    if duplicate:
        response.status_code = status.HTTP_200_OK
    public = DatasetPublic.of(dataset, settings.data_dir, datasets.readers(
        dataset, store.active_job_configs(session), settings.data_dir))
    return SnapshotPublic(**public.model_dump(), duplicate=duplicate, feedback_ids=ids)


class NoFeedback(ValueError):
    """No feedback of the snapshot's filters gives a record of its kind."""


def make_snapshot(session, settings, kind: str, model: str | None = None, ids: list[int] | None = None,
                  name: str | None = None) -> tuple[Dataset, bool, list[int]]:
    """The feedback of `model` (or `ids`; None: all) as a data set of `kind` (`db.feedback.records`), stored as an
    upload: (the data set, whether it was stored already, the feedback ids it holds). Raises `NoFeedback` when none
    gives a record, `backend.datasets.DatasetRefused` when the store refuses it. Also the next round's feedback
    (`POST /api/jobs/{id}/continue`)."""
    rows = feedback.matching(session, model=model, ids=ids)
    records = feedback.records(rows, kind)
    if not records:
        about = f" about {model}" if model is not None else ""
        raise NoFeedback(f"no feedback{about} gives a {kind} record ({len(rows)} matching row(s))")
    content = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records).encode()
    held = [r["feedback_id"] for r in records]
    name = name or f"feedback {kind} ({len(held)}: #{held[0]}–#{held[-1]})"
    dataset, duplicate = datasets.upload(session, settings, io.BytesIO(content), f"feedback-{kind}.jsonl", name=name,
                                         fmt=kind, columns=None, skip_bad_rows=False)
    logger.info(f"feedback snapshot: {len(held)} {kind} record(s) as data set {dataset.id}")
    return dataset, duplicate, held
