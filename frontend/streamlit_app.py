"""EdgeRLHF dashboard: launch jobs, watch them live, compare runs (`edgerlhf frontend`).

Entry point for `streamlit run frontend/streamlit_app.py`: declares the pages with `st.navigation`
(pages live in `app_pages/`), checks that the backend answers, asks a session for the API token when the
backend needs one (`frontend.login`: typed once per browser session, never taken from the server's
environment), says in the sidebar which part of the service is up (`frontend.health`: backend, database, workers),
and runs the chosen page. The dashboard
talks only to the backend API (`frontend.api_client`); jobs live in the backend's database and the
worker, never in this process, so closing or reloading a tab loses nothing.
"""

from __future__ import annotations

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
if str(HERE.parent) not in sys.path:  # `streamlit run` from a checkout that is not pip-installed
    sys.path.insert(0, str(HERE.parent))

import streamlit as st  # noqa: E402

from edgerlhf.settings import get_settings  # noqa: E402
from frontend import health, login, ui  # noqa: E402
from frontend.api_client import ApiError, BackendDown, get_client  # noqa: E402

st.set_page_config(page_title="EdgeRLHF", page_icon="🎛️", layout="wide")

training = [
    st.Page("app_pages/jobs.py", title="Jobs", icon=":material/list:", default=True),
    st.Page("app_pages/new_job.py", title="New job", icon=":material/add_circle:", url_path="new"),
    st.Page("app_pages/datasets.py", title="Data sets", icon=":material/dataset:", url_path="datasets"),
    st.Page("app_pages/job.py", title="Job", icon=":material/monitoring:", url_path="job"),
    st.Page("app_pages/probes.py", title="Probe prompts", icon=":material/compare:", url_path="probes"),
    st.Page("app_pages/compare.py", title="Compare", icon=":material/stacked_line_chart:", url_path="compare"),
]
if (HERE / "app_pages" / "chat.py").exists():
    training.append(st.Page("app_pages/chat.py", title="Chat", icon=":material/chat:", url_path="chat"))
training.append(st.Page("app_pages/feedback.py", title="Feedback", icon=":material/thumbs_up_down:",
                        url_path="feedback"))
training.append(st.Page("app_pages/arena.py", title="Arena", icon=":material/how_to_vote:", url_path="arena"))
system = [st.Page("app_pages/system.py", title="System", icon=":material/memory:", url_path="system")]

page = st.navigation({"Training": training, "Service": system})

# One cheap health check per full rerun: the banner says plainly that the backend is down, instead of
# every panel failing on its own. Live fragments check again on their own refreshes.
st.session_state["backend_down"] = False
client = get_client()
try:
    client.health()
except BackendDown as exc:
    ui.backend_down(exc)  # sets `backend_down`, so the page's own calls do not repeat the banner
except ApiError:
    pass  # it answered: up, even if /healthz itself complains

st.sidebar.caption(f"Backend: `{get_settings().api_url}`")
if not login.require_login(client):  # the login form is on the page instead
    st.stop()
login.logout_button()
with st.sidebar:
    health.sidebar_status()
page.run()
