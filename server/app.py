"""`deepseek-ocr-server`: the Sanic app over one Pipeline, and its command line.

Flags are the CLI's (`--model`, `--model-dir`, `--model-config`, `--tokenizer`, `--weights`, `--backend`,
`--device`, `--dtype`, every inference key such as `--max-new-tokens`, `--config`) plus the `[server]` keys
(`--host`, `--port`, `--api-key`, `--api-key-file`, `--insecure-no-auth`, `--allow-private-urls`, `--queue-size`,
...). Precedence is flag > config.toml > default, resolved by `common.config.load_settings`; request fields then
override per request. The API key may also come from the `DEEPSEEK_OCR_API_KEY` environment variable.
"""
from __future__ import annotations

import argparse
import dataclasses
import ipaddress
import itertools
import logging
import os
import sys
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import httpx
from sanic import Sanic

from common.config import (FLAG_NAMES, INFERENCE_RULES, SERVER_RULES, ServerSettings, Settings, load_settings,
                           warn_ignored_sampling)
from common.cli import package_version
from common.errors import UserError
from common.pipeline import Pipeline

from .admission import AdmissionGate, GuardedProtocol
from .images import FetchLimits, ImageLoader, Resolver, system_resolver
from .routes import register
from .schemas import CallSpec
from .worker import Worker

log = logging.getLogger("deepseek_ocr.server")

#: A non-streamed answer may take minutes on CPU; Sanic's default of 60 s would turn it into a 503.
RESPONSE_TIMEOUT_S = 6 * 3600
#: Where the API key may come from when neither `api_key` nor `api_key_file` is set.
API_KEY_ENV = "DEEPSEEK_OCR_API_KEY"
_app_names = itertools.count()


def resolve_api_key(server: ServerSettings, environ: Mapping[str, str] = os.environ) -> str | None:
    """The key from `api_key`, else `api_key_file` (its first line), else `$DEEPSEEK_OCR_API_KEY`; None if none.

    A file or the environment keeps the key out of the process list. Naming two sources is an error, and so is
    a blank key from any of them: a server meant to be protected must not silently run open.
    """
    if server.api_key is not None and server.api_key_file is not None:
        raise UserError("--api-key and --api-key-file are both set; use one")
    if server.api_key is not None:
        key, where = server.api_key, "--api-key"
    elif server.api_key_file is not None:
        path = Path(server.api_key_file).expanduser()
        try:
            key = path.read_text(encoding="utf-8").splitlines()[0] if path.stat().st_size else ""
        except (OSError, UnicodeDecodeError) as exc:
            raise UserError(f"--api-key-file: cannot read {path}: {exc}") from None
        where = f"--api-key-file {path}"
    elif API_KEY_ENV in environ:
        key, where = environ[API_KEY_ENV], f"${API_KEY_ENV}"
    else:
        return None
    if not key.strip():
        raise UserError(f"{where}: the API key is blank")
    return key.strip()


def is_loopback_host(host: str) -> bool:
    """True for `localhost` and loopback addresses (127.0.0.0/8, ::1): only this machine can connect."""
    if host.strip().lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip().strip("[]")).is_loopback
    except ValueError:
        return False


def check_exposure(server: ServerSettings, api_key: str | None) -> None:
    """Refuse to listen beyond loopback without an API key unless `insecure_no_auth` says so on purpose."""
    if api_key or is_loopback_host(server.host) or server.insecure_no_auth:
        return
    raise UserError(f"refusing to listen on {server.host} without an API key: set --api-key-file, --api-key or "
                    f"${API_KEY_ENV}, or pass --insecure-no-auth to allow anyone who can reach the port")


class ServerState:
    """What the handlers share: settings, the scheduler, the image loader."""

    def __init__(self, settings: Settings, pipeline: Any, scheduler: Any, loader: ImageLoader,
                 gate: AdmissionGate) -> None:
        self.settings = settings
        self.pipeline = pipeline
        self.scheduler = scheduler
        self.loader = loader
        self.gate = gate
        self.api_key = settings.server.api_key

    def check_overrides(self, spec: CallSpec) -> None:
        """Refuse bad per-request values (400, naming the field) before the request takes a queue slot."""
        given = {k: v for k, v in spec.overrides().items() if k in INFERENCE_RULES}
        inference = self.settings.inference.with_overrides(given)
        # top_p while sampling is off is ignored, with one log line (temperature > 0 is what turns sampling on).
        warn_ignored_sampling(inference, given, hint="send a temperature > 0 to sample")

    def token_decoder(self, model_id: str) -> Callable[[int], str]:
        """id -> text for logprob entries, looked up at each call: the model may still be loading when the
        request starts, and it is resident once it has produced tokens."""
        def decode(token_id: int) -> str:
            tokenizer = self.pipeline.loaded_tokenizer(model_id)
            return tokenizer.decode([token_id]) if tokenizer is not None else ""
        return decode


def create_app(settings: Settings, *, pipeline: Any | None = None, scheduler: Any | None = None,
               resolver: Resolver = system_resolver, transport: httpx.AsyncBaseTransport | None = None,
               preload: bool = True, name: str | None = None) -> Sanic:
    """The Sanic app. `pipeline`, `scheduler`, `resolver` and `transport` replace the real ones (tests).

    The API key is resolved here (`resolve_api_key`); serve it with `protocol=GuardedProtocol` (as `main` does)
    for the connection cap and the request deadline.
    """
    settings = dataclasses.replace(settings, server=dataclasses.replace(
        settings.server, api_key=resolve_api_key(settings.server), api_key_file=None))
    server = settings.server
    # configure_logging=False: records go to the root logger only (main() sets it up), not printed twice.
    app = Sanic(name or f"deepseek_ocr_server_{next(_app_names)}", configure_logging=False)
    app.config.REQUEST_MAX_SIZE = server.max_request_bytes
    app.config.RESPONSE_TIMEOUT = RESPONSE_TIMEOUT_S
    app.config.REQUEST_TIMEOUT = server.request_timeout_s
    app.config.KEEP_ALIVE_TIMEOUT = server.keep_alive_timeout_s
    app.config.MAX_CONNECTIONS = server.max_connections
    app.config.FALLBACK_ERROR_FORMAT = "json"
    # TouchUp rewrites Sanic's class methods at the first start; a second app started in the same process (tests,
    # embedding) then fails in it (KeyError '_run_response_middleware'). The rewrite only trims a few calls.
    app.config.TOUCHUP = False
    pipeline = pipeline if pipeline is not None else Pipeline(settings)
    scheduler = scheduler if scheduler is not None else Worker(pipeline, server.queue_size,
                                                               max_batch_size=server.max_batch_size)
    limits = FetchLimits(timeout_s=server.image_fetch_timeout_s, max_bytes=server.image_max_bytes,
                         allow_private=server.allow_private_urls, max_urls=server.max_image_urls,
                         request_bytes=server.image_fetch_request_bytes,
                         request_timeout_s=server.image_fetch_request_timeout_s)
    loader = ImageLoader(limits, server.max_image_pixels, resolver=resolver, transport=transport,
                         max_images=server.max_images_per_request, decode_workers=server.decode_workers)
    batch = server.max_batch_size or Worker.DEFAULT_BATCH_ACCELERATOR
    gate = AdmissionGate(server.max_inflight_requests or server.queue_size + batch, server.max_inflight_pixels,
                         server.max_request_pixels)
    app.ctx.state = ServerState(settings, pipeline, scheduler, loader, gate)
    register(app)

    @app.before_server_start
    async def _start(app: Sanic) -> None:
        # The worker thread loads the active model first, so the first request does not pay for it.
        scheduler.start(preload=[settings.active_model] if preload else [])

    @app.after_server_stop
    async def _stop(app: Sanic) -> None:
        scheduler.stop()
        await loader.close()
        loader.shutdown()

    return app


def _flag_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="deepseek-ocr-server",
                                     description="OpenAI-compatible HTTP server for DeepSeek-OCR and PaddleOCR-VL.")
    parser.add_argument("--config", type=Path, default=None, help="config.toml (default: the per-user one)")
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    parser.add_argument("--no-preload", action="store_true", help="load the active model on first use only")
    parser.add_argument("--version", action="version", version=f"deepseek-ocr-server {package_version()}")
    booleans = {k for rules in (INFERENCE_RULES, SERVER_RULES) for k, r in rules.items() if r.kind is bool}
    for key in FLAG_NAMES:
        if key == "config":  # the model's config.json is --model-config; --config is config.toml
            continue
        names = [f"--{key.replace('_', '-')}"] + ([f"--{key}"] if "_" in key else [])
        if key in booleans:
            # `--allow-private-urls` alone means true; `--allow-private-urls false` also works.
            parser.add_argument(*names, dest=key, nargs="?", const="true", default=None, metavar="BOOL")
        else:
            parser.add_argument(*names, dest=key, default=None, metavar=key.upper())
    return parser


def parse_command_line(argv: Sequence[str] | None = None) -> tuple[Settings, dict[str, Any]]:
    """(settings with flag > config.toml > default applied, server-only options: log_level, preload)."""
    args = vars(_flag_parser().parse_args(argv))
    config_path, level, no_preload = args.pop("config"), args.pop("log_level"), args.pop("no_preload")
    settings = load_settings(config_path, {k: v for k, v in args.items() if v is not None})
    return settings, {"log_level": level, "preload": not no_preload}


def main(argv: Sequence[str] | None = None) -> int:
    """Console entry point: parse flags, load settings, serve until interrupted (SIGINT/SIGTERM exit 0)."""
    try:
        settings, options = parse_command_line(argv)
        logging.basicConfig(level=options["log_level"].upper(),
                            format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        check_exposure(settings.server, resolve_api_key(settings.server))
        app = create_app(settings, preload=options["preload"])
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    server = settings.server
    if not is_loopback_host(server.host) and not app.ctx.state.api_key:
        log.warning("listening on %s without an API key (--insecure-no-auth): anyone who can reach this port "
                    "can use it", server.host)
    app.run(host=server.host, port=server.port, single_process=True, access_log=False, motd=False,
            protocol=GuardedProtocol)
    return 0


if __name__ == "__main__":
    sys.exit(main())
