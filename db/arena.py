"""The arena's votes: store, list, read, delete (the backend's arena routes call these; nobody else writes SQL).

A vote is one row of `arena_votes` (`db.models.ArenaVote`); what it means as preference data and for the
leaderboard is `edgerlhf.votes`.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from typing import Any

from sqlalchemy import delete, func, or_, select
from sqlalchemy.orm import Session

from db.models import INT64_MAX, ArenaVote, VoteChoice


def add_vote(session: Session, *, prompt: str, model_a: str, model_b: str, answer_a: str, answer_b: str,
             choice: VoteChoice | str, better: str | None = None, prompt_source: str | None = None) -> ArenaVote:
    vote = ArenaVote(prompt=prompt, model_a=model_a, model_b=model_b, answer_a=answer_a, answer_b=answer_b,
                     choice=VoteChoice(choice), better=better, prompt_source=prompt_source)
    session.add(vote)
    session.commit()
    return vote


def list_votes(session: Session, limit: int = 50, offset: int = 0) -> tuple[list[ArenaVote], int]:
    """One page of votes, newest first, and how many there are."""
    total = session.scalar(select(func.count()).select_from(ArenaVote)) or 0
    votes = session.scalars(select(ArenaVote).order_by(ArenaVote.id.desc()).limit(limit).offset(offset)).all()
    return list(votes), total


def all_votes(session: Session) -> Sequence[ArenaVote]:
    """Every vote, oldest first. Whole rows in memory: the export and the snapshot read `votes_after` page by page."""
    return session.scalars(select(ArenaVote).order_by(ArenaVote.id)).all()


def count_votes(session: Session) -> int:
    return session.scalar(select(func.count()).select_from(ArenaVote)) or 0


def votes_after(session: Session, after_id: int, limit: int, models: Collection[str] | None = None) -> list[ArenaVote]:
    """Up to `limit` votes with an id above `after_id`, oldest first: one page of the export or the snapshot; with
    `models`, only the votes with one of them on either side (the next round's votes about a job's model)."""
    query = select(ArenaVote).where(ArenaVote.id > after_id)
    if models is not None:
        query = query.where(or_(ArenaVote.model_a.in_(models), ArenaVote.model_b.in_(models)))
    return list(session.scalars(query.order_by(ArenaVote.id).limit(limit)))


def outcomes(session: Session) -> list[dict[str, str]]:
    """Every vote's `model_a`, `model_b` and `choice`, oldest first: what the leaderboard reads (not the texts)."""
    rows = session.execute(select(ArenaVote.model_a, ArenaVote.model_b, ArenaVote.choice).order_by(ArenaVote.id))
    return [{"model_a": a, "model_b": b, "choice": VoteChoice(c).value} for a, b, c in rows]


def get_vote(session: Session, vote_id: int) -> ArenaVote | None:
    if not 0 < vote_id <= INT64_MAX:  # beyond 64 bits no engine can even bind it: no such vote
        return None
    return session.get(ArenaVote, vote_id)


def delete_vote(session: Session, vote_id: int) -> bool:
    """Delete one vote; False when there was none."""
    if get_vote(session, vote_id) is None:
        return False
    session.execute(delete(ArenaVote).where(ArenaVote.id == vote_id))
    session.commit()
    return True


def as_dict(vote: ArenaVote) -> dict[str, Any]:
    """A vote as the plain data `edgerlhf.votes` reads."""
    return {"id": vote.id, "created_at": vote.created_at, "prompt": vote.prompt, "prompt_source": vote.prompt_source,
            "model_a": vote.model_a, "model_b": vote.model_b, "answer_a": vote.answer_a, "answer_b": vote.answer_b,
            "choice": vote.choice.value, "better": vote.better}
