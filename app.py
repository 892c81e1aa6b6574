"""LDM Studio: the composition root. ``./launch.sh`` runs this; it serves http://127.0.0.1:7860.

    python app.py [--listen] [--auth USER:PASSWORD | --auth-file FILE] [--port 7860] [--models-dir DIR ...] [--lora-dir DIR ...] [--embeddings-dir DIR ...]
                  [--outputs outputs] [--device auto] [--dtype auto] [--memory-format auto] [--compile] [--no-winograd]
                  [--no-cuda-graphs] [--no-cpu-kernels] [--concurrency 1] [--api] [--nowebui] [--api-auth U:P[,U:P]]

It serves this machine only (127.0.0.1) unless ``--listen`` is given; ``--auth`` (repeatable) or
``--auth-file`` (one USER:PASSWORD a line) asks for a login.

``--api`` also serves the AUTOMATIC1111-compatible API (``/sdapi/v1``, docs at ``/docs``; see ``api/``) on
the same port; ``--nowebui`` serves the API alone (port 7861 unless ``--port``). ``--api-auth``
logins, and the studio's own, are asked of API clients by HTTP Basic.

Models are listed from weights/ and from every --models-dir (also the LDM_STUDIO_MODELS variable,
folders separated by ':'); they load when first used and stay loaded.
"""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path

from ldm.devices import choose_device, choose_dtype, keep_freed_memory
from ldm.kernels.paths import SpeedPaths
from ldm.options import add_device_arguments, add_memory_budget_argument

ROOT = Path(__file__).resolve().parent


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="app.py", description="LDM Studio in the browser")
    parser.add_argument("--listen", action="store_true", help="serve the local network too (0.0.0.0), not only this machine")
    parser.add_argument("--host", default=None, help="the address to serve on (default 127.0.0.1; 0.0.0.0 with --listen)")
    parser.add_argument("--auth", action="append", default=[], metavar="USER:PASSWORD", help="ask for this login (repeatable)")
    parser.add_argument("--auth-file", metavar="FILE", help="ask for a login: one USER:PASSWORD a line (# comments)")
    parser.add_argument("--port", type=int, default=None, help="default 7860 (7861 with --nowebui)")
    parser.add_argument("--api", action="store_true", help="also serve the AUTOMATIC1111-compatible API at /sdapi/v1")
    parser.add_argument("--nowebui", action="store_true", help="serve the API alone, without the studio (port 7861)")
    parser.add_argument("--api-auth", metavar="USER:PASSWORD[,USER:PASSWORD]", help="logins API clients must "
                        "send by HTTP Basic (the studio's --auth logins are also taken)")
    parser.add_argument("--models-dir", action="append", default=[], help="another folder of checkpoints (repeatable)")
    parser.add_argument("--lora-dir", action="append", default=[], help="a folder of LoRA files for <lora:NAME:WEIGHT> "
                        "prompt tags (repeatable; models/Lora beside each models folder is always searched)")
    parser.add_argument("--embeddings-dir", action="append", default=[], help="a folder of textual-inversion "
                        "embeddings, used where a prompt names one (repeatable; models/embeddings beside each models "
                        "folder is always searched)")
    parser.add_argument("--outputs", default=str(ROOT / "outputs"), help="where images are saved, in one folder per day")
    add_device_arguments(parser)
    parser.add_argument("--concurrency", type=int, default=1, help="generations that may run at once (one per model at most)")
    add_memory_budget_argument(parser, note="; the tabs' tiling sections start from it")
    args = parser.parse_args(argv)
    args.host = args.host or ("0.0.0.0" if args.listen else "127.0.0.1")
    args.port = args.port or (7861 if args.nowebui else 7860)
    try:
        args.logins = logins(args.auth, args.auth_file)
        api_pairs = [pair for pair in (args.api_auth or "").split(",") if pair.strip()]
        args.api_logins = [*logins(api_pairs, None), *args.logins] if api_pairs else list(args.logins)
    except ValueError as error:
        parser.error(str(error))
    return args


def logins(pairs: list[str], path: str | None) -> list[tuple[str, str]]:
    """The (user, password) logins of --auth and --auth-file; a malformed one is refused by its place."""
    lines = [(f"--auth {pair!r}", pair) for pair in pairs]
    if path:
        try:
            text = Path(path).expanduser().read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as error:
            raise ValueError(f"cannot read the auth file {path}: {error}") from None
        lines += [(f"{path} line {i}", line.strip()) for i, line in enumerate(text.splitlines(), 1)
                  if line.strip() and not line.strip().startswith("#")]
        if not lines:
            raise ValueError(f"the auth file {path} holds no USER:PASSWORD line")
    found = []
    for where, pair in lines:
        user, colon, password = (part.strip() for part in pair.partition(":"))  # spaces around a part are ignored
        if not colon or not user or not password:
            raise ValueError(f"{where}: a login must be USER:PASSWORD with neither part empty")
        found.append((user, password))
    return found


def make_studio(args: argparse.Namespace):
    from ui.outputs import OutputWriter
    from ui.services import ModelCache, Studio

    folders = [*args.models_dir, *filter(None, os.environ.get("LDM_STUDIO_MODELS", "").split(":"))]
    device = choose_device(args.device)
    keep_freed_memory(device)
    return Studio([Path(f).expanduser() for f in folders], OutputWriter(Path(args.outputs)),
                  ModelCache(device, choose_dtype(args.dtype, device), args.memory_format, SpeedPaths.from_arguments(args)),
                  memory_budget_mb=args.memory_budget, extra_lora_dirs=[Path(d).expanduser() for d in args.lora_dir],
                  extra_embedding_dirs=[Path(d).expanduser() for d in args.embeddings_dir])


def launch(studio, host: str, port: int, concurrency: int = 1, block: bool = True, logins=None, api=None,
           api_logins=()):
    """Build the page, warm the default model, and serve (behind a login when ``logins`` are
    given). Only the outputs folder and Gradio's own temporary files are served; ``api`` (an
    ``api.engine.ApiEngine``) adds the /sdapi/v1 routes, behind ``api_logins``. Returns the Gradio
    app (for tests)."""
    from ui.studio import CSS, SHORTCUTS_JS, build_app

    default = studio.default_for("txt2img")
    if default:
        studio.models.get(default)  # the embedded model is ready when the page opens
    app = build_app(studio)
    app.queue(default_concurrency_limit=concurrency)
    server, _, _ = app.launch(server_name=host, server_port=port, prevent_thread_lock=True, show_error=False,
                              quiet=not block, allowed_paths=[str(studio.writer.root)], js=SHORTCUTS_JS, css=CSS,
                              footer_links=[], auth=logins or None,
                              app_kwargs={"docs_url": "/docs"} if api is not None else None)
    if api is not None:
        from api.server import mount

        mount(server, api, api_logins)
    if block:
        app.block_thread()
    return app


def api_engine(studio, args: argparse.Namespace):
    """The API's engine over the studio; /cmd-flags shows the flags, less the logins."""
    from api.engine import ApiEngine

    secret = ("auth", "auth_file", "api_auth", "logins", "api_logins")
    return ApiEngine(studio, flags={k: v for k, v in vars(args).items() if k not in secret})


def serve_api_only(studio, args: argparse.Namespace) -> None:
    """--nowebui: the API alone, the default model warmed first."""
    from api.server import serve, standalone_app

    default = studio.default_for("txt2img")
    if default:
        studio.models.get(default)
    serve(standalone_app(api_engine(studio, args), args.api_logins), args.host, args.port)


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    if args.concurrency < 1:
        raise SystemExit("--concurrency must be at least 1")
    studio = make_studio(args)
    what = "API" if args.nowebui else "LDM Studio"
    print(f"{what}: http://{args.host}:{args.port}  (outputs in {studio.writer.root})", flush=True)
    if args.api or args.nowebui:
        print(f"AUTOMATIC1111-compatible API: http://{args.host}:{args.port}/sdapi/v1  (docs at /docs)", flush=True)
    if args.host not in ("127.0.0.1", "localhost", "::1") and not (args.api_logins if args.nowebui else args.logins):
        print("Warning: the server is open to the network with no login; add --auth (or --api-auth) USER:PASSWORD", flush=True)
    if args.nowebui:
        serve_api_only(studio, args)
        return
    api = api_engine(studio, args) if args.api else None
    launch(studio, args.host, args.port, args.concurrency, logins=args.logins, api=api, api_logins=args.api_logins)


if __name__ == "__main__":
    main()
