"""The dashboard's side of the arena: its API calls, and the New job form's choice to train on the votes.

Calls go through the one API client (`frontend.api_client`) and read exactly the fields of the backend's
arena schemas (`backend/api/routes/arena.py`); a missing field raises `ContractError`. The Arena page is
`app_pages/arena.py`; what a vote means as data is `edgerlhf.votes`.
"""

from __future__ import annotations

from typing import Any

import streamlit as st

from edgerlhf.contract import merge_overrides
from frontend.api_client import ApiClient, _field

ARENA_KINDS = ("sft", "ppo")
"""The policies the arena compares (the backend refuses others)."""
NO_VOTES, VOTES_ONLY, VOTES_MIXED = "Not used", "Votes only", "Votes mixed with the data set"


def contestants(client: ApiClient) -> list[str]:
    """Model ids the arena can compare, newest job first (`GET /v1/models`, its sft and ppo policies)."""
    listing = client.request("GET", "/v1/models")
    return [m["id"] for m in _field(listing, "data", "/v1/models") if m["id"].rsplit("/", 1)[-1] in ARENA_KINDS]


def held_out_prompts(client: ApiClient, job_id: int) -> list[str]:
    """A job's held-out prompts (`PromptsPublic.prompts`)."""
    return _field(client.request("GET", "/api/arena/prompts", params={"job_id": job_id}), "prompts",
                  "/api/arena/prompts")


def cast_vote(client: ApiClient, **body: Any) -> dict[str, Any]:
    """Store a vote (`VoteCreate` -> `VotePublic`)."""
    return client.request("POST", "/api/arena/votes", json=body)


def votes(client: ApiClient, limit: int = 200) -> tuple[list[dict[str, Any]], int]:
    """The newest votes (`VotesPublic.items`) and how many there are in all."""
    page = client.request("GET", "/api/arena/votes", params={"limit": limit})
    return _field(page, "items", "/api/arena/votes"), _field(page, "total", "/api/arena/votes")


def delete_vote(client: ApiClient, vote_id: int) -> None:
    client.request("DELETE", f"/api/arena/votes/{vote_id}")


def export_jsonl(client: ApiClient) -> str:
    """Every vote's preference pairs as JSONL (`GET /api/arena/votes/export`)."""
    return client.request("GET", "/api/arena/votes/export") or ""


def snapshot(client: ApiClient) -> dict[str, Any]:
    """Write the votes' pairs to a file for a job (`SnapshotPublic`: `path`, `votes`, `pairs`, `vote_ids`)."""
    return client.request("POST", "/api/arena/votes/snapshot")


def leaderboard(client: ApiClient) -> dict[str, Any]:
    """`LeaderboardPublic`: `models` (best first), `pairs` (head to head), `votes`, `rated_votes`."""
    board = client.request("GET", "/api/arena/leaderboard")
    for name in ("models", "pairs", "votes", "rated_votes"):
        _field(board, name, "/api/arena/leaderboard")
    return board


# --- the New job form --------------------------------------------------------------------------------------


def votes_option(client: ApiClient, key: str) -> tuple[str, float]:
    """The form's "train on the arena's votes" choice: (mode, the votes' share of the training pairs)."""
    st.subheader("Arena votes", divider="gray")
    try:
        _, total = votes(client, limit=1)
    except Exception:  # the count is a hint only; the snapshot at launch says what is wrong
        total = None
    mode = st.radio("Train on the arena's votes", [NO_VOTES, VOTES_ONLY, VOTES_MIXED], horizontal=True,
                    key=f"{key}:mode",
                    help="Your votes on the Arena page become preference pairs (a written better answer is the "
                         "chosen side against both answers shown). At launch they are written to a file under "
                         "the data dir and the job reads that file (`data.votes_file`), so later votes do not "
                         "change it; its data report lists the votes it used.")
    weight = 1.0
    if mode == VOTES_MIXED:
        weight = st.slider("Share of training pairs from votes", 0.05, 0.95, 0.5, 0.05, key=f"{key}:weight",
                           help="`data.votes_weight`: vote pairs are repeated until they make up this share of "
                                "the training pairs; the data set's held-out prompts stay held out.")
    if total is not None:
        st.caption(f"{total} vote(s) in the arena." + ("" if total else " Cast some on the **Arena** page first."))
    return mode, weight


def with_votes(client: ApiClient, overrides: dict[str, Any], option: tuple[str, float]) -> dict[str, Any]:
    """`overrides` plus the votes: a fresh snapshot as `data.votes_file` and its weight (unchanged when not used).
    Raises the API's error (409: no vote makes a pair yet)."""
    mode, weight = option
    if mode == NO_VOTES:
        return overrides
    snap = snapshot(client)
    return merge_overrides(overrides, {"data": {"votes_file": _field(snap, "path", "/api/arena/votes/snapshot"),
                                                "votes_weight": 1.0 if mode == VOTES_ONLY else float(weight)}})
