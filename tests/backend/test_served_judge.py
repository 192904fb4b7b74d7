"""A finished job's model as the judge of another job's answers, through the service's own `/v1`: the plumbing of the
`judge` reward end to end (a real backend serving a model a real worker trained). Its grades are noise, the
model being a random tiny one; what is checked is the calls, the parsing, the cache and the component's scores."""

from edgerlhf.config import RewardComponent
from edgerlhf.rewards import RewardSet

PROMPT = "\n\nHuman: Is the sky blue?\n\nAssistant:"


def test_a_finished_jobs_model_judges_through_the_services_v1(finished_service):
    component = RewardComponent(kind="judge", url=finished_service.url + "/v1",
                                model=f"job-{finished_service.jobs['ppo']}/ppo", max_score=10.0, timeout_s=60.0)
    stated = RewardSet([component])
    total, parts = stated.score([PROMPT] * 3, ["Yes, it is.", "No.", "Yes, it is."])
    judge = stated._scorers[0]
    assert judge.requests == 2  # the repeated answer was judged once
    assert total.shape == (3,) and total[0] == total[2]
    assert all(0.0 <= g <= 1.0 for g in total.tolist())  # a reply's number over max_score, or 0 when it has none
    assert parts[component.kind + "0"].tolist() == total.tolist()
