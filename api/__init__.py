"""An AUTOMATIC1111-compatible HTTP API (``/sdapi/v1``), so the tools that speak it (webuiapi, Open
WebUI, SillyTavern, openOutpaint, ...) can drive the studio's engine. ``app.py --api`` mounts it on
the studio's server, ``--nowebui`` serves it alone. It runs on the studio's own ``ui.services.Studio``:
the same model cache and per-model locks, memory budget and outputs writer as the tabs.

    codec.py    images in (base64 or data URL, size-limited) and out (base64 PNG with parameters)
    schema.py   the request bodies, with AUTOMATIC1111's fields and defaults
    engine.py   requests -> the tasks of ldm/, progress, interrupt and skip, the current model
    routes.py   the routes, errors as AUTOMATIC1111's body, HTTP Basic logins
    server.py   mounting on the studio's app, or serving the API alone
"""
