"""The ``/sdapi/v1`` routes. Every route: the request body read up to a limit (a larger one is a 413
before it is read whole), HTTP Basic checked when logins are set (and an Authorization header
ignored when none are: Open WebUI and SillyTavern always send one), and every error answered with
AUTOMATIC1111's body ``{error, detail, body, errors}``: 422 for a request the engine refuses (its
message names the field and what is allowed), 400 for an unreadable image, 413 for one too large,
401 for a wrong login, 500 only for a fault of the server.

Generation routes are plain functions, so FastAPI runs them in its thread pool and ``/progress``,
``/interrupt`` and ``/skip`` answer while one runs."""

from __future__ import annotations

import base64
import binascii
import logging
import secrets
from collections.abc import Sequence

import torch
from fastapi import APIRouter, Depends, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute

from api import codec, schema
from api.engine import SAMPLER_ALIASES, ApiEngine, scheduler_name
from ldm.sampling.samplers import SAMPLERS
from ldm.sampling.sigmas import SCHEDULES
from ldm.tasks.hires import LATENT_UPSCALERS
from ldm.tasks.parameters import parse_parameters
from ui.errors import message_for
from ui.outputs import OutputError

log = logging.getLogger(__name__)

PREFIX = "/sdapi/v1"
MAX_BODY_BYTES = 128 << 20


class BodyTooLarge(Exception):
    pass


def error_body(status: int, name: str, detail, errors=None, headers: dict | None = None) -> JSONResponse:
    return JSONResponse(status_code=status, headers=headers,
                        content={"error": name, "detail": detail, "body": "", "errors": detail if errors is None else errors})


def validation_message(error: RequestValidationError) -> tuple[str, list[str]]:
    """A validation error as one sentence naming each field, and the list of its parts."""
    parts = []
    for item in error.errors():
        where = ".".join(str(p) for p in item.get("loc", ()) if p != "body") or "the request body"
        parts.append(f"{where}: {item.get('msg', 'is not valid')}")
    return "; ".join(parts) or "the request body is not valid", parts


def answer_error(error: Exception) -> JSONResponse:
    name = type(error).__name__
    if isinstance(error, HTTPException):
        return error_body(error.status_code, name, error.detail, headers=getattr(error, "headers", None))
    if isinstance(error, BodyTooLarge):
        return error_body(413, name, str(error))
    if isinstance(error, RequestValidationError):
        message, parts = validation_message(error)
        return error_body(422, name, message, parts)
    if isinstance(error, codec.ImageInputError):
        return error_body(error.status, name, str(error))
    if isinstance(error, ValueError):
        return error_body(422, name, str(error))
    if isinstance(error, (MemoryError, torch.OutOfMemoryError, OutputError)):
        return error_body(500, name, message_for(error))
    log.error("API request failed", exc_info=error)
    return error_body(500, name, message_for(error), str(error))


def api_route_class(max_body: int):
    """An APIRoute whose handler reads the body up to ``max_body`` bytes and answers errors as AUTOMATIC1111 does."""

    class ApiRoute(APIRoute):
        def get_route_handler(self):
            handler = super().get_route_handler()

            async def guarded(request: Request):
                try:
                    await read_limited(request, max_body)
                    return await handler(request)
                except Exception as error:  # noqa: BLE001 - every failure is answered with a body
                    return answer_error(error)

            return guarded

    return ApiRoute


async def read_limited(request: Request, limit: int) -> None:
    """Read the body, refusing it (413) once it passes ``limit`` bytes, by its length header or as it comes."""
    if request.method not in ("POST", "PUT", "PATCH"):
        return
    length = request.headers.get("content-length", "")
    if length.isdigit() and int(length) > limit:
        raise BodyTooLarge(f"the request body is {int(length)} bytes; at most {limit} are taken")
    chunks, total = [], 0
    async for chunk in request.stream():
        total += len(chunk)
        if total > limit:
            raise BodyTooLarge(f"the request body is over {limit} bytes; at most {limit} are taken")
        chunks.append(chunk)
    request._body = b"".join(chunks)  # what FastAPI reads the body from


def basic_auth(logins: Sequence[tuple[str, str]]):
    """A dependency that asks for one of ``logins`` by HTTP Basic; with none it lets every request in."""
    pairs = [(u.encode(), p.encode()) for u, p in logins]

    async def check(request: Request) -> None:
        if not pairs:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() == "basic":
            try:
                user, _, password = base64.b64decode(token.strip(), validate=True).partition(b":")
            except (binascii.Error, ValueError):
                user, password = b"", b""
            matches = [secrets.compare_digest(user, u) & secrets.compare_digest(password, p) for u, p in pairs]
            if any(matches):
                return
        raise HTTPException(401, "Incorrect username or password", headers={"WWW-Authenticate": "Basic"})

    return check


def memory() -> dict:
    """RAM (from /proc/meminfo) and CUDA memory as AUTOMATIC1111's /memory reports them."""
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            info = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in f if line.split()[1:]}
        total, free = info["MemTotal"], info.get("MemAvailable", info["MemFree"])
        ram = {"free": free, "used": total - free, "total": total}
    except (OSError, KeyError, ValueError) as error:
        ram = {"error": str(error)}
    if not torch.cuda.is_available():
        return {"ram": ram, "cuda": {"error": "unavailable"}}
    free, total = torch.cuda.mem_get_info()
    stats = torch.cuda.memory_stats()

    def pair(name):
        return {"current": stats.get(f"{name}_bytes.all.current", 0), "peak": stats.get(f"{name}_bytes.all.peak", 0)}

    cuda = {"system": {"free": free, "used": total - free, "total": total},
            "active": pair("active"), "allocated": pair("allocated"), "reserved": pair("reserved"),
            "inactive": pair("inactive_split"),
            "events": {"retries": stats.get("num_alloc_retries", 0), "oom": stats.get("num_ooms", 0)}}
    return {"ram": ram, "cuda": cuda}


def api_router(engine: ApiEngine, logins: Sequence[tuple[str, str]] = (), max_body: int = MAX_BODY_BYTES) -> APIRouter:
    router = APIRouter(prefix=PREFIX, route_class=api_route_class(max_body), dependencies=[Depends(basic_auth(logins))],
                       tags=["AUTOMATIC1111 API"])
    studio = engine.studio

    @router.post("/txt2img", summary="Text to image (ldm.tasks.txt2img)")
    def txt2img(body: schema.Txt2Img):
        return engine.txt2img(body)

    @router.post("/img2img", summary="Image to image (ldm.tasks.img2img); with a mask, inpainting (ldm.tasks.inpaint)")
    def img2img(body: schema.Img2Img):
        return engine.img2img(body)

    @router.post("/extra-single-image", summary="Upscale one image (ldm.tasks.upscale models, Lanczos, Nearest)")
    def extra_single_image(body: schema.ExtrasSingle):
        images, notices = engine.extras(body, [codec.decode_image(body.image, "image")])
        return {"html_info": " ".join(notices), "image": codec.encode_png(images[0])}

    @router.post("/extra-batch-images", summary="Upscale several images")
    def extra_batch_images(body: schema.ExtrasBatch):
        if not body.imageList:
            raise codec.ImageInputError("imageList is empty: send [{data: base64, name: ...}, ...]")
        pictures = [codec.decode_image(item.data, f"imageList[{i}]") for i, item in enumerate(body.imageList)]
        images, notices = engine.extras(body, pictures)
        return {"html_info": " ".join(notices), "images": [codec.encode_png(i) for i in images]}

    @router.post("/png-info", summary="The generation parameters a PNG carries")
    def png_info(body: schema.PngInfo):
        image = codec.decode_image(body.image, "image")
        text = {k: v for k, v in getattr(image, "text", {}).items() if isinstance(v, str)}
        info = text.pop("parameters", "")
        return {"info": info, "items": text, "parameters": parse_parameters(info) if info else {}}

    @router.get("/progress", summary="The running job's progress and live preview")
    def progress(skip_current_image: bool = False):
        return engine.progress(skip_current_image)

    @router.post("/interrupt", summary="Stop the API's running job; it returns what it had")
    def interrupt():
        engine.interrupt()
        return {}

    @router.post("/skip", summary="Stop the running batch; the job goes on with the next")
    def skip():
        engine.skip()

    @router.get("/options", summary="Settings; sd_model_checkpoint is the model the API uses")
    def get_options():
        return {**engine.options, "sd_model_checkpoint": engine.current_title(),
                "sd_checkpoint_hash": engine.model_hash(engine.checkpoint) if engine.checkpoint else None}

    @router.post("/options", summary="Change settings; a new sd_model_checkpoint is loaded before this returns")
    def set_options(body: dict):
        wanted = body.get("sd_model_checkpoint")
        if wanted is not None and wanted != engine.current_title():
            engine.set_checkpoint(wanted)
        engine.options.update({k: v for k, v in body.items() if k not in ("sd_model_checkpoint", "sd_checkpoint_hash")})

    @router.post("/unload-checkpoint", summary="Free the API's model (it loads again when next used)")
    def unload_checkpoint():
        engine.unload()
        return {}

    @router.post("/reload-checkpoint", summary="Load the API's model again")
    def reload_checkpoint():
        engine.reload()
        return {}

    @router.get("/cmd-flags", summary="The server's command-line flags")
    def cmd_flags():
        return engine.flags

    @router.get("/samplers")
    def samplers():
        return [{"name": name, "aliases": SAMPLER_ALIASES.get(name, []),
                 "options": {} if s.automatic is None else {"scheduler": scheduler_name(s.automatic)}}
                for name, s in SAMPLERS.items()]

    @router.get("/schedulers")
    def schedulers():
        return [{"name": scheduler_name(label), "label": label, "aliases": None, "default_rho": -1.0,
                 "need_inner_model": False} for label in SCHEDULES]

    @router.get("/upscalers")
    def upscalers():
        rows = [{"name": "None", "model_name": None, "model_path": None, "model_url": None, "scale": 4},
                *({"name": n, "model_name": None, "model_path": None, "model_url": None, "scale": 4} for n in ("Lanczos", "Nearest"))]
        rows += [{"name": e.name, "model_name": e.preset.name, "model_path": str(e.path), "model_url": None,
                  "scale": e.preset.model.downsampling_factor} for e in engine.upscalers()]
        return rows

    @router.get("/latent-upscale-modes", summary="The hires fix's latent upscalers (hr_upscaler names)")
    def latent_upscale_modes():
        return [{"name": name} for name in LATENT_UPSCALERS]

    @router.get("/sd-models")
    def sd_models():
        return [{"title": engine.title(e), "model_name": e.name, "hash": engine.model_hash(e.path), "sha256": None,
                 "filename": str(e.path), "config": None} for e in engine.checkpoints()]

    @router.get("/sd-vae", summary="Empty: each model uses its own autoencoder")
    def sd_vae():
        return []

    @router.get("/prompt-styles", summary="Empty: the studio has no saved styles")
    def prompt_styles():
        return []

    @router.get("/scripts", summary="Empty: no scripts or extensions")
    def scripts():
        return {"txt2img": [], "img2img": []}

    @router.get("/loras")
    def loras():
        return [{"name": a.name, "alias": a.name, "path": str(a.path), "metadata": {}}
                for a in studio.addons() if a.kind == "lora"]

    @router.post("/refresh-loras")
    def refresh_loras():
        studio.addons(refresh=True)

    @router.get("/embeddings")
    def embeddings():
        found = [a for a in studio.addons() if a.kind == "embedding"]
        row = lambda a: {"step": None, "sd_checkpoint": None, "sd_checkpoint_name": None, "shape": None, "vectors": a.vectors}
        return {"loaded": {a.name: row(a) for a in found if a.problem is None},
                "skipped": {a.name: row(a) for a in found if a.problem is not None}}

    @router.post("/refresh-embeddings")
    def refresh_embeddings():
        studio.addons(refresh=True)

    @router.post("/refresh-checkpoints")
    def refresh_checkpoints():
        studio.catalog(refresh=True)

    @router.get("/memory")
    def memory_route():
        return memory()

    return router
