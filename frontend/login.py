"""The dashboard's login: each browser session types the backend's API token once (issue 28, finding 1).

With `EDGERLHF_API_TOKEN` set, the backend answers only requests that carry the token. The dashboard does not hold
it for its visitors (it would be an open door to the API for anyone who reaches the dashboard): a session that the
backend refuses sees this form and nothing else, the token it types is kept in that session's state
(`frontend.api_client.TOKEN_KEY`) and goes with that session's requests only. A reload or another browser is a new
session and asks again. Without a token on the backend there is nothing to type and no form.
"""

from __future__ import annotations

import streamlit as st

from frontend.api_client import CLIENT_KEY, TOKEN_KEY, ApiClient, ApiError, BackendDown

FIELD_KEY = "login_token"
"""The password box."""
VERIFIED_KEY = "login_verified"
"""(backend URL, token) that the backend accepted in this session: asked once, not on every rerun."""
REFUSED_KEY = "login_refused"
"""The token typed last was refused."""


def _take_token() -> None:
    st.session_state[TOKEN_KEY] = (st.session_state.get(FIELD_KEY) or "").strip() or None
    st.session_state[FIELD_KEY] = ""  # the box forgets it; the session keeps it
    st.session_state[REFUSED_KEY] = False


def log_out() -> None:
    """Forget this session's token (and its client)."""
    for key in (TOKEN_KEY, CLIENT_KEY, VERIFIED_KEY, REFUSED_KEY):
        st.session_state.pop(key, None)


def _form(client: ApiClient) -> None:
    st.title("Log in")
    st.write(f"The backend at `{client.base_url}` needs its API token (the `EDGERLHF_API_TOKEN` it was started "
             "with). It is kept in this browser session only, and sent to the backend with this session's requests.")
    with st.form("login"):
        st.text_input("API token", type="password", key=FIELD_KEY, autocomplete="current-password")
        st.form_submit_button("Log in", key="login_submit", type="primary", on_click=_take_token)
    if st.session_state.get(REFUSED_KEY):
        st.error("Wrong token: the backend refused it.", icon=":material/key_off:")


def require_login(client: ApiClient) -> bool:
    """True when this session may use the backend (it needs no token, or it took this session's); else the login
    form is drawn and the page must not run. A backend that does not answer lets the page run: it shows the banner,
    and every call it makes fails (or, once the backend is back, is refused until the login)."""
    if st.session_state.get(VERIFIED_KEY) == (client.base_url, client.token):
        return True
    try:
        client.list_jobs(limit=1)
    except BackendDown:
        return True
    except ApiError as exc:
        if exc.status != 401:
            return True  # answered, and the token was not the problem: the page shows its own errors
        st.session_state[REFUSED_KEY] = client.token is not None
        _form(client)
        return False
    st.session_state[VERIFIED_KEY] = (client.base_url, client.token)
    return True


def logout_button() -> None:
    """A sidebar button that logs this session out, when it logged in."""
    if st.session_state.get(TOKEN_KEY):
        st.sidebar.button("Log out", key="logout", icon=":material/logout:", on_click=log_out)
