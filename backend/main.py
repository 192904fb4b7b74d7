"""The EdgeRLHF backend: FastAPI app factory, middleware, error handling, and the `edgerlhf backend` command.

    edgerlhf backend [--host 127.0.0.1] [--port 8000]
    uvicorn backend.main:app

It enqueues and reads; it never trains. Routers live in `backend/api/routes/` (one per resource,
included under `/api`; the chat router under `/v1`), after fastapi/full-stack-fastapi-template.
OpenAPI docs are at `/docs` (Swagger UI) and `/redoc`, their scripts and styles served from this process (the
`fastapi-offline` package's copies, `DOCS_ASSETS`), not from a CDN, so they work on a machine without internet. With `EDGERLHF_API_TOKEN` set, every request but `/healthz` needs
`Authorization: Bearer <token>`; only trusted `Host` names are served and a browser page of another site cannot
change state (`backend/api/middleware.py`; README: "Security"). A client never sees a server traceback: unexpected
errors answer `500 {"detail": "internal server error"}` and the traceback goes to the backend's log; no response
fails to render (`backend/api/errors.py`).
"""

from __future__ import annotations

import argparse
import logging
from contextlib import asynccontextmanager
from pathlib import Path

import fastapi_offline
from fastapi import FastAPI
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html, get_swagger_ui_oauth2_redirect_html
from fastapi.responses import HTMLResponse
from fastapi.staticfiles import StaticFiles

from backend import chat_models
from backend.api.errors import SafeJSONResponse, install_error_handlers
from backend.api.middleware import BodyLimitMiddleware, SameSiteMiddleware, TokenMiddleware, UnicodeMiddleware
from backend.api.routes import arena, chat, datasets, export, feedback, jobs, metrics, plan, rewards, system
from db import init_db, make_engine, make_sessionmaker
from edgerlhf import locations
from edgerlhf.settings import Settings, get_settings, is_loopback

logger = logging.getLogger("edgerlhf.backend")

DOCS_ASSETS = "/docs-assets"
"""Where Swagger UI's and ReDoc's scripts, styles and icon are served from (FastAPI's recipe "self-hosting JavaScript
and CSS for docs"): the files the `fastapi-offline` package ships, Swagger UI 5 (OpenAPI 3.1) and ReDoc 2."""
_DOCS_FILES = Path(fastapi_offline.__file__).parent / "static"


def add_docs(app: FastAPI) -> None:
    """`/docs` and `/redoc` on assets served by the app itself (`DOCS_ASSETS`), for an app made with
    `docs_url=None, redoc_url=None`."""
    app.mount(DOCS_ASSETS, StaticFiles(directory=_DOCS_FILES), name="docs-assets")
    redirect = app.swagger_ui_oauth2_redirect_url

    @app.get("/docs", include_in_schema=False)
    async def swagger_ui() -> HTMLResponse:
        return get_swagger_ui_html(openapi_url=app.openapi_url, title=f"{app.title} - Swagger UI",
                                   oauth2_redirect_url=redirect, swagger_js_url=f"{DOCS_ASSETS}/swagger-ui-bundle.js",
                                   swagger_css_url=f"{DOCS_ASSETS}/swagger-ui.css",
                                   swagger_favicon_url=f"{DOCS_ASSETS}/favicon.png")

    @app.get(redirect, include_in_schema=False)
    async def swagger_ui_redirect() -> HTMLResponse:
        return get_swagger_ui_oauth2_redirect_html()

    @app.get("/redoc", include_in_schema=False)
    async def redoc() -> HTMLResponse:
        return get_redoc_html(openapi_url=app.openapi_url, title=f"{app.title} - ReDoc",
                              redoc_js_url=f"{DOCS_ASSETS}/redoc.standalone.js",
                              redoc_favicon_url=f"{DOCS_ASSETS}/favicon.png", with_google_fonts=False)


def create_app(settings: Settings | None = None) -> FastAPI:
    """A backend app on `settings` (default: the environment's); creates the database tables if needed."""
    settings = settings or get_settings()
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    locations.set_download_limit(settings.max_download_bytes)  # a registered hub data set, a preview's tokenizer
    engine = make_engine(settings.db_url)
    init_db(engine)

    @asynccontextmanager
    async def lifespan(_app: FastAPI):
        yield
        engine.dispose()

    app = FastAPI(title="EdgeRLHF", version="0.1.0", lifespan=lifespan, default_response_class=SafeJSONResponse,
                  docs_url=None, redoc_url=None,  # `add_docs`: the same pages on local assets
                  description="RLHF (SFT, reward model, PPO) on one consumer GPU: queue jobs, watch them live, chat "
                              "with the results. Jobs live in the database and the worker, not in a browser tab.")
    app.state.settings = settings
    app.state.engine = engine
    app.state.sessions = make_sessionmaker(engine)
    app.state.job_deleted_hooks = [chat_models.unload_job]
    """Callables `hook(job_id)` run after a job is deleted (the chat models of that job are unloaded)."""

    app.include_router(system.health_router)
    app.include_router(system.router, prefix="/api")
    app.include_router(jobs.router, prefix="/api")
    app.include_router(plan.router, prefix="/api")
    app.include_router(export.router, prefix="/api")
    app.include_router(metrics.router, prefix="/api")
    app.include_router(arena.router, prefix="/api")
    app.include_router(datasets.router, prefix="/api")
    app.include_router(rewards.router, prefix="/api")
    app.include_router(feedback.router, prefix="/api")
    app.include_router(chat.router, prefix="/v1")
    add_docs(app)

    # Outermost first in the request path: the token, Host and Origin, the size limit, the body's Unicode,
    # then routing (the last added runs first). The token is checked here and nowhere else: a middleware sees
    # every request (/api, /v1, the SSE streams, /docs, unknown paths), where a router dependency would only
    # guard the routes it is attached to; and it runs first, so no unauthenticated body is ever read.
    app.add_middleware(UnicodeMiddleware)
    # A data set file is the one body allowed past `max_body_bytes` (its own limit, counted as it streams).
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_body_bytes,
                       uploads={f"/api{datasets.router.prefix}": settings.max_upload_bytes + datasets.FORM_BYTES})
    app.add_middleware(SameSiteMiddleware, hosts=settings.allowed_hosts)
    app.add_middleware(TokenMiddleware, token=settings.api_token)
    install_error_handlers(app)

    return app


def __getattr__(name: str):
    # `backend.main:app` is built on first access, so importing this module has no side effects.
    if name == "app":
        app = create_app()
        globals()["app"] = app
        return app
    raise AttributeError(name)


def main(argv: list[str] | None = None) -> int:
    import uvicorn

    from edgerlhf.log import setup_logging

    settings = get_settings()
    parser = argparse.ArgumentParser(prog="edgerlhf backend", description="Run the EdgeRLHF API server.")
    parser.add_argument("--host", default=settings.backend_host, help="interface to bind (default %(default)s)")
    parser.add_argument("--port", type=int, default=settings.backend_port, help="port (default %(default)s)")
    args = parser.parse_args(argv)
    setup_logging("backend", settings.log_level)
    settings = settings.model_copy(update={"backend_host": args.host})  # a --host is a trusted Host name too
    if not is_loopback(args.host):
        if not settings.api_token:
            logger.warning(f"binding to {args.host} without EDGERLHF_API_TOKEN: anyone on the network can queue jobs")
        logger.info(f"answering the Host names {sorted(settings.allowed_hosts)} (EDGERLHF_TRUSTED_HOSTS adds more)")
    app = create_app(settings)
    # A line per request only when asked for (EDGERLHF_VERBOSE, `edgerlhf up --verbose`): the dashboard's live panels
    # poll, and their requests were most of what a terminal running `up` showed.
    uvicorn.run(app, host=args.host, port=args.port, log_config=None, access_log=settings.verbose)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
