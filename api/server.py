"""Where the API is served: on the studio's own FastAPI app (``app.py --api``, the studio's port), or
alone (``--nowebui``, port 7861 unless ``--port`` is given, as AUTOMATIC1111). OpenAPI docs at ``/docs``."""

from __future__ import annotations

from collections.abc import Sequence

from fastapi import FastAPI

from api.engine import ApiEngine
from api.routes import MAX_BODY_BYTES, api_router

NOWEBUI_PORT = 7861
TITLE = "LDM Studio: AUTOMATIC1111-compatible API"


def mount(app: FastAPI, engine: ApiEngine, logins: Sequence[tuple[str, str]] = (), max_body: int = MAX_BODY_BYTES) -> FastAPI:
    """Add the ``/sdapi/v1`` routes to ``app`` (the studio's, after Gradio has built it)."""
    app.include_router(api_router(engine, logins, max_body))
    app.openapi_schema = None  # the schema is rebuilt with the new routes
    return app


def standalone_app(engine: ApiEngine, logins: Sequence[tuple[str, str]] = (), max_body: int = MAX_BODY_BYTES) -> FastAPI:
    """The API alone, with its docs at /docs."""
    return mount(FastAPI(title=TITLE, docs_url="/docs", redoc_url=None), engine, logins, max_body)


def serve(app: FastAPI, host: str, port: int) -> None:
    """Serve ``app`` until stopped (the ``--nowebui`` server)."""
    import uvicorn

    uvicorn.run(app, host=host, port=port, log_level="info")
