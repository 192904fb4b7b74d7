"""Arena votes as data: the preference pairs a vote makes, their place in a job's data, and the leaderboard.

The arena (`backend/api/routes/arena.py`, the dashboard's Arena page) shows a person two answers to one
prompt from two models, names hidden, and stores their judgement. Here is what a judgement means, in plain
Python (no torch, no database: the backend, the data stage and the tests share it):

**Pairs** (`vote_pairs`), in the processed format of the data stage (`{"prompt", "chosen", "rejected"}`,
the prompt in HH form `"\\n\\nHuman: ...\\n\\nAssistant:"`):

    choice      without a better answer     with a better answer written by the person
    a           (A > B)                     (better > A), (better > B), (A > B)
    b           (B > A)                     (better > A), (better > B), (B > A)
    tie         nothing                     (better > A), (better > B)
    both_bad    nothing                     (better > A), (better > B)

A written answer is the person's own, so it is the chosen side against *both* answers shown (they judged
it better than either); a tie or "both bad" says nothing about A against B, so it makes no pair alone.
Pairs whose two sides are the same text are left out. Every pair carries its `vote_id`.

**The next round** (`mix`, called once by the data stage after its own cleaning and split): with
`data.votes_file` set, the vote pairs of that file are cleaned like the data set's (empty chosen answer,
identical sides, duplicates, the token budgets; each drop counted), split by prompt (a prompt the data set
already put on one side stays there: no held-out prompt is trained on), and mixed in: `data.votes_weight`
is the share of the training pairs that are votes, reached by repeating each vote pair a whole number of
times; 1 means the votes alone (the data set's pairs are read, then set aside). Votes are the person's
labels: `data.labels = gold` relabels the data set only. The data report's `votes` part names the file and
counts exactly the votes used (`vote_ids`), and `data/votes.jsonl` keeps those pairs in the run directory.

**Leaderboard** (`leaderboard`): per model, votes, wins, losses and ties (a tie or "both bad" is half a win
each), the win rate, and a Bradley–Terry rating (Bradley & Terry 1952; Hunter 2004, "MM algorithms for
generalized Bradley–Terry models"; the rating of LMSYS's Chatbot Arena, Chiang et al. 2024) on the Elo
scale (400 points = 10:1 odds), maximised by Newton's method. Each model also plays one virtual tie against
an anchor rated 1000, so a model that won every vote gets a finite rating and one vote moves a rating a
little, not to infinity. Votes of a model against itself (two samples of one model) make pairs but rate
nothing.
"""

from __future__ import annotations

import enum
import json
import math
import random
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from edgerlhf.contract import VOTES_PAIRS
from edgerlhf.dialogue import DialogueError, normalize_prompt, render_chat
from edgerlhf.errors import StageError

PERSON = "person"
"""Who wrote a better answer: `chosen_by` of its pairs."""
ANCHOR_RATING = 1000.0
"""The rating of the virtual opponent every model ties once (and of a model that has only tied)."""
ELO_SCALE = 400.0 / math.log(10)
"""Rating points per unit of log-strength: 400 points = odds of 10 to 1."""


class VoteChoice(str, enum.Enum):
    """What the person said about answers A and B."""

    a = "a"
    """A is better."""
    b = "b"
    """B is better."""
    tie = "tie"
    """Both are about as good."""
    both_bad = "both_bad"
    """Neither is acceptable."""


class VotesError(StageError, ValueError):
    """A votes file cannot be used; the message says why and names the line."""


# --- prompts and pairs ---------------------------------------------------------------------------------


def arena_prompt(text: str) -> str:
    """The HH prompt of what the person gave the arena: a dialogue that starts with `Human:` (a held-out
    prompt) is taken as it is; anything else is one user message. Raises `DialogueError` when empty.

    >>> arena_prompt("How far can spiders jump?")
    '\\n\\nHuman: How far can spiders jump?\\n\\nAssistant:'
    """
    stripped = text.strip()
    if not stripped:
        raise DialogueError("empty prompt")
    if stripped.startswith("Human:"):
        return normalize_prompt(stripped)
    return render_chat([{"role": "user", "content": stripped}])


def vote_pairs(vote: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The preference pairs of one vote (see the module docstring). `vote` has `id`, `prompt` (HH form),
    `model_a`, `model_b`, `answer_a`, `answer_b`, `choice` and `better` (None when not written)."""
    choice = VoteChoice(vote["choice"])
    a = (vote["answer_a"].strip(), vote["model_a"])
    b = (vote["answer_b"].strip(), vote["model_b"])
    better = (vote.get("better") or "").strip()
    comparisons = []
    if better:
        comparisons += [((better, PERSON), a), ((better, PERSON), b)]
    if choice == VoteChoice.a:
        comparisons.append((a, b))
    elif choice == VoteChoice.b:
        comparisons.append((b, a))
    return [{"prompt": vote["prompt"], "chosen": chosen, "rejected": rejected, "vote_id": int(vote["id"]),
             "choice": choice.value, "chosen_by": chosen_by, "rejected_by": rejected_by}
            for (chosen, chosen_by), (rejected, rejected_by) in comparisons if chosen != rejected]


def export_lines(votes: Iterable[Mapping[str, Any]]) -> Iterable[str]:
    """The JSONL lines of the pairs of `votes` (the export and the snapshot a job reads)."""
    for vote in votes:
        for pair in vote_pairs(vote):
            yield json.dumps(pair, ensure_ascii=False) + "\n"


def read_votes_file(path: str | Path) -> list[dict[str, Any]]:
    """The pairs of an exported votes file; `VotesError` naming the line for anything else."""
    path = Path(path).expanduser()
    if not path.is_absolute() or not path.is_file():
        raise VotesError(f"data.votes_file: {path} is not an existing local file (write one with "
                         "POST /api/arena/votes/snapshot or the Arena page's export)")
    rows = []
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                if not isinstance(row, dict):
                    raise ValueError("not a JSON object")
                for key in ("prompt", "chosen", "rejected"):
                    if not isinstance(row.get(key), str):
                        raise ValueError(f"field {key!r} is missing or not a string")
                if isinstance(row.get("vote_id"), bool) or not isinstance(row.get("vote_id"), int):
                    raise ValueError("field 'vote_id' is missing or not an integer")
                row["prompt"] = normalize_prompt(row["prompt"])
            except (ValueError, DialogueError) as exc:
                raise VotesError(f"{path}:{lineno}: {exc}") from None
            rows.append(row)
    return rows


# --- the next round: votes in a job's data -------------------------------------------------------------


def _n_tokens(tokenizer, texts: list[str]) -> list[int]:
    if not texts:
        return []
    return [len(ids) for ids in tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"]]


def clean_vote_pairs(rows: list[dict[str, Any]], cfg, tokenizer) -> tuple[list[dict[str, Any]], Counter]:
    """The usable vote pairs, in file order, and the drops by reason (the data stage's rules)."""
    dropped: Counter = Counter()
    kept, seen = [], set()
    for row in rows:
        chosen, rejected = row["chosen"].strip(), row["rejected"].strip()
        key = (row["prompt"], frozenset((chosen, rejected)))
        if not chosen:
            dropped["empty_chosen"] += 1  # an empty rejected answer is kept: "empty is worse" is a lesson
        elif chosen == rejected:
            dropped["identical_responses"] += 1
        elif key in seen:
            dropped["duplicate"] += 1
        else:
            seen.add(key)
            kept.append({**row, "chosen": chosen, "rejected": rejected})
    prompt_len = _n_tokens(tokenizer, [p["prompt"] for p in kept])
    response_len = _n_tokens(tokenizer, [" " + p[side] for p in kept for side in ("chosen", "rejected")])
    budgeted = []
    for i, pair in enumerate(kept):
        if prompt_len[i] > cfg.max_prompt_tokens:
            dropped["prompt_too_long"] += 1
        elif max(response_len[2 * i], response_len[2 * i + 1]) > cfg.max_response_tokens:
            dropped["response_too_long"] += 1
        else:
            budgeted.append(pair)
    return budgeted, dropped


def split_vote_pairs(pairs: list[dict[str, Any]], train_prompts: set[str], test_prompts: set[str],
                     test_fraction: float, seed: int) -> tuple[list[dict], list[dict]]:
    """Vote pairs -> (train, test), by prompt: a prompt the data set put on one side stays on that side;
    the other prompts, in a shuffled order fixed by `seed`, fill about `test_fraction` of the pairs."""
    train = [p for p in pairs if p["prompt"] in train_prompts]
    test = [p for p in pairs if p["prompt"] in test_prompts and p["prompt"] not in train_prompts]
    free = [p for p in pairs if p["prompt"] not in train_prompts and p["prompt"] not in test_prompts]
    prompts = sorted({p["prompt"] for p in free})
    random.Random(seed).shuffle(prompts)
    per_prompt = Counter(p["prompt"] for p in free)
    # Only free prompts can go to test; at least one when the votes have no held-out side otherwise.
    target = round(len(pairs) * test_fraction) - len(test)
    if not test and len(prompts) >= 2:
        target = max(1, target)
    held_out, n = set(), 0
    for prompt in prompts[:-1] if not train else prompts:  # keep at least one prompt for training
        if n >= target:
            break
        held_out.add(prompt)
        n += per_prompt[prompt]
    train += [p for p in free if p["prompt"] not in held_out]
    test += [p for p in free if p["prompt"] in held_out]
    return train, test


def repeats_for(weight: float, n_votes: int, n_data: int) -> int:
    """How many copies of each training vote pair make the votes about `weight` of the training pairs
    (at least one; with `weight` 1 there is no data set, so one)."""
    if weight >= 1 or n_data == 0 or n_votes == 0:
        return 1
    return max(1, round(weight / (1 - weight) * n_data / n_votes))


def mix(config, ctx, train: list[dict], test: list[dict], tokenizer) -> tuple[list[dict], list[dict], dict | None]:
    """The data stage's train and test pairs with the votes of `config.data.votes_file` mixed in, and the
    report's `votes` part (None and the pairs unchanged without a votes file). Writes `data/votes.jsonl`."""
    cfg = config.data
    if not cfg.votes_file:
        return train, test, None
    rows = read_votes_file(cfg.votes_file)
    pairs, dropped = clean_vote_pairs(rows, cfg, tokenizer)
    alone = cfg.votes_weight >= 1
    data_train = {p["prompt"] for p in train} if not alone else set()
    data_test = {p["prompt"] for p in test} if not alone else set()
    vote_train, vote_test = split_vote_pairs(pairs, data_train, data_test, cfg.test_fraction, config.seed)
    if alone and not (vote_train and vote_test):
        raise VotesError(f"data.votes_file: the votes alone (data.votes_weight=1) need usable pairs on at least two "
                         f"prompts, one held out; {cfg.votes_file} has {len(pairs)} usable pair(s) on "
                         f"{len({p['prompt'] for p in pairs})} prompt(s) (dropped: {dict(dropped) or 'none'})")
    if alone:
        train, test = [], []
    repeats = repeats_for(cfg.votes_weight, len(vote_train), len(train))

    def plain(pair: dict) -> dict:
        return {"prompt": pair["prompt"], "chosen": pair["chosen"], "rejected": pair["rejected"]}

    mixed = train + [plain(p) for p in vote_train] * repeats
    random.Random(config.seed).shuffle(mixed)
    used = sorted({p["vote_id"] for p in vote_train + vote_test})
    out = ctx.run_dir / VOTES_PAIRS
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w", encoding="utf-8") as f:
        for side, part in (("train", vote_train), ("test", vote_test)):
            for pair in part:
                f.write(json.dumps({**pair, "split": side}, ensure_ascii=False) + "\n")
    ctx.artifact("data", out)
    n_vote_train = len(vote_train) * repeats
    info = {"file": str(cfg.votes_file), "pairs_read": len(rows), "votes_read": len({r["vote_id"] for r in rows}),
            "dropped": dict(sorted(dropped.items())), "votes_used": len(used), "vote_ids": used,
            "train_pairs": len(vote_train), "test_pairs": len(vote_test), "repeats": repeats,
            "weight": cfg.votes_weight, "share": round(n_vote_train / len(mixed), 4) if mixed else 0.0,
            "with_data_set": not alone}
    ctx.log(f"arena votes: {len(used)} vote(s) used ({len(vote_train)} train pair(s) x{repeats}, "
            f"{len(vote_test)} held out), {info['share']:.0%} of the training pairs"
            + ("" if not alone else "; the data set's own pairs are set aside (data.votes_weight=1)"))
    ctx.log_metrics({"data/votes_used": len(used), "data/votes_share": info["share"]}, step=0)
    return mixed, test + [plain(p) for p in vote_test], info


# --- the leaderboard ---------------------------------------------------------------------------------------


def outcome(choice: str) -> float:
    """A's score in one vote: 1 (A better), 0 (B better), 0.5 (a tie or both bad)."""
    return {VoteChoice.a: 1.0, VoteChoice.b: 0.0}.get(VoteChoice(choice), 0.5)


def bradley_terry(games: Iterable[tuple[str, str, float]], iterations: int = 100,
                  tol: float = 1e-12) -> dict[str, float]:
    """Bradley–Terry ratings (Elo scale) of `(model_a, model_b, a's score)` games between different models.

    P(i beats j) = p_i / (p_i + p_j); a tie counts as half a win each way, and each model plays one virtual tie
    against the anchor (p = 1, rated `ANCHOR_RATING`). The maximum of the likelihood, found by Newton's method
    on log p (the anchor makes it strictly concave; Hunter's MM iteration reaches the same point, slowly);
    rating_i = ANCHOR_RATING + 400 log10 p_i.
    """
    wins: dict[str, float] = defaultdict(float)
    meetings: dict[str, Counter] = defaultdict(Counter)
    for a, b, score in games:
        if a == b:
            continue
        wins[a] += score
        wins[b] += 1.0 - score
        meetings[a][b] += 1
        meetings[b][a] += 1
    names = sorted(meetings)
    index = {m: k for k, m in enumerate(names)}
    theta = [0.0] * len(names)  # log p
    for _ in range(iterations):
        grad = [wins[m] + 0.5 for m in names]
        hess = [[0.0] * len(names) for _ in names]  # minus the Hessian: positive definite
        for i, m in enumerate(names):
            anchor = 1.0 / (1.0 + math.exp(-theta[i]))  # P(m beats the anchor)
            grad[i] -= anchor
            hess[i][i] += anchor * (1 - anchor)
            for other, n in meetings[m].items():
                j = index[other]
                p_ij = 1.0 / (1.0 + math.exp(theta[j] - theta[i]))
                grad[i] -= n * p_ij
                hess[i][i] += n * p_ij * (1 - p_ij)
                hess[i][j] -= n * p_ij * (1 - p_ij)
        step = _solve(hess, grad)
        largest = max((abs(x) for x in step), default=0.0)
        scale = min(1.0, 2.0 / largest) if largest else 1.0  # damped: never more than e^2 per step
        theta = [t + scale * x for t, x in zip(theta, step)]
        if largest < tol:
            break
    return {m: ANCHOR_RATING + ELO_SCALE * theta[index[m]] for m in names}


def _solve(a: list[list[float]], b: list[float]) -> list[float]:
    """x with a x = b, for a symmetric positive definite `a` (Gaussian elimination; a few models)."""
    n = len(b)
    a = [row[:] + [b[i]] for i, row in enumerate(a)]
    for k in range(n):
        for i in range(k + 1, n):
            factor = a[i][k] / a[k][k]
            if factor:
                for j in range(k, n + 1):
                    a[i][j] -= factor * a[k][j]
    x = [0.0] * n
    for i in reversed(range(n)):
        x[i] = (a[i][n] - sum(a[i][j] * x[j] for j in range(i + 1, n))) / a[i][i]
    return x


def leaderboard(votes: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
    """The win-rate table and Bradley–Terry ratings of the models in `votes` (dicts with `model_a`,
    `model_b`, `choice`): `models` best first, `pairs` (head to head), `votes` (all), `rated_votes`."""
    votes = list(votes)
    games = [(v["model_a"], v["model_b"], outcome(v["choice"])) for v in votes]
    rated = [g for g in games if g[0] != g[1]]
    ratings = bradley_terry(rated)
    table: dict[str, Counter] = defaultdict(Counter)
    heads: dict[tuple[str, str], Counter] = defaultdict(Counter)
    for a, b, score in rated:
        for me, other, mine in ((a, b, score), (b, a, 1.0 - score)):
            row = table[me]
            row["votes"] += 1
            row["wins" if mine == 1 else "losses" if mine == 0 else "ties"] += 1
        first, second = sorted((a, b))
        head = heads[(first, second)]
        head["votes"] += 1
        score_first = score if first == a else 1.0 - score
        head["first_wins" if score_first == 1 else "second_wins" if score_first == 0 else "ties"] += 1
    models = [{"model": m, "votes": row["votes"], "wins": row["wins"], "losses": row["losses"], "ties": row["ties"],
               "win_rate": (row["wins"] + 0.5 * row["ties"]) / row["votes"], "rating": round(ratings[m], 1)}
              for m, row in table.items()]
    models.sort(key=lambda r: (-r["rating"], r["model"]))
    pairs = [{"model_a": a, "model_b": b, "votes": h["votes"], "a_wins": h["first_wins"], "b_wins": h["second_wins"],
              "ties": h["ties"], "a_win_rate": (h["first_wins"] + 0.5 * h["ties"]) / h["votes"]}
             for (a, b), h in sorted(heads.items())]
    return {"models": models, "pairs": pairs, "votes": len(votes), "rated_votes": len(rated)}
