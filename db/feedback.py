"""Feedback from chat: store, list, delete, and turn into training records (the backend's feedback routes call these;
nobody else writes SQL for it).

A row is one `db.models.Feedback`: a thumb and/or a better answer about one reply. As training data, in the formats
of `edgerlhf.formats` (conversational: the prompt is the conversation's messages) and each record carrying its
`feedback_id`, so a data set made of them says exactly which feedback it holds:

    unpaired        every thumb                {"prompt", "completion", "label": up}
    demonstration   every better answer        {"prompt", "completion": the better answer}
    preference      every better answer        {"prompt", "chosen": the better answer, "rejected": the reply}
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from db.models import Feedback

KINDS = ("unpaired", "demonstration", "preference")
"""What feedback can become (`edgerlhf.formats.KINDS` that feedback fills)."""


def add_feedback(session: Session, **fields: Any) -> Feedback:
    row = Feedback(**fields)
    session.add(row)
    session.commit()
    return row


def _filtered(query, model: str | None, rating: int | None, has_better: bool | None, ids: list[int] | None):
    if model is not None:
        query = query.where(Feedback.model == model)
    if rating is not None:
        query = query.where(Feedback.rating == rating)
    if has_better is not None:
        query = query.where(Feedback.better.is_not(None) if has_better else Feedback.better.is_(None))
    if ids is not None:
        query = query.where(Feedback.id.in_(ids))
    return query


def list_feedback(session: Session, *, model: str | None = None, rating: int | None = None,
                  has_better: bool | None = None, limit: int = 50, offset: int = 0) -> tuple[list[Feedback], int]:
    """One page of feedback, newest first, and how many match."""
    total = session.scalar(_filtered(select(func.count()).select_from(Feedback), model, rating, has_better, None)) or 0
    rows = session.scalars(_filtered(select(Feedback), model, rating, has_better, None)
                           .order_by(Feedback.id.desc()).limit(limit).offset(offset)).all()
    return list(rows), total


def get_feedback(session: Session, feedback_id: int) -> Feedback | None:
    return session.get(Feedback, feedback_id)


def delete_feedback(session: Session, row: Feedback) -> None:
    session.delete(row)
    session.commit()


def _assistant(text: str) -> list[dict[str, str]]:
    return [{"role": "assistant", "content": text}]


def records(rows: list[Feedback], kind: str) -> list[dict[str, Any]]:
    """The training records of `kind` that `rows` give, oldest first (see the module docstring)."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, not {kind!r}")
    out = []
    for row in sorted(rows, key=lambda r: r.id):
        if kind == "unpaired" and row.rating is not None:
            out.append({"prompt": row.messages, "completion": _assistant(row.reply), "label": row.rating > 0,
                        "feedback_id": row.id})
        elif kind == "demonstration" and row.better:
            out.append({"prompt": row.messages, "completion": _assistant(row.better), "feedback_id": row.id})
        elif kind == "preference" and row.better:
            out.append({"prompt": row.messages, "chosen": _assistant(row.better), "rejected": _assistant(row.reply),
                        "feedback_id": row.id})
    return out


def matching(session: Session, *, model: str | None = None, ids: list[int] | None = None) -> list[Feedback]:
    """Every feedback row of `model` (None: any), or of `ids`, oldest first."""
    return list(session.scalars(_filtered(select(Feedback), model, None, None, ids).order_by(Feedback.id)).all())
