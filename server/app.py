"""`deepseek-ocr-server`: the Sanic app over one Pipeline, and its command line.

Flags are the CLI's (`--model`, `--model-dir`, `--model-config`, `--tokenizer`, `--weights`, `--backend`,
`--device`, `--dtype`, every inference key such as `--max-new-tokens`, `--config`) plus the `[server]` keys
(`--host`, `--port`, `--api-key`, `--allow-private-urls`, `--queue-size`, ...). Precedence is flag >
config.toml > default, resolved by `common.config.load_settings`; request fields then override per request.
"""
from __future__ import annotations

import argparse
import itertools
import logging
import sys
from pathlib import Path
from typing import Any, Callable, Sequence

import httpx
from sanic import Sanic

from common.config import FLAG_NAMES, INFERENCE_RULES, SERVER_RULES, Settings, load_settings
from common.errors import UserError
from common.pipeline import Pipeline

from .images import FetchLimits, ImageLoader, Resolver, system_resolver
from .routes import register
from .schemas import CallSpec
from .worker import Worker

log = logging.getLogger("deepseek_ocr.server")

#: A non-streamed answer may take minutes on CPU; Sanic's default of 60 s would turn it into a 503.
RESPONSE_TIMEOUT_S = 6 * 3600
_app_names = itertools.count()


class ServerState:
    """What the handlers share: settings, the scheduler, the image loader."""

    def __init__(self, settings: Settings, pipeline: Any, scheduler: Any, loader: ImageLoader) -> None:
        self.settings = settings
        self.pipeline = pipeline
        self.scheduler = scheduler
        self.loader = loader
        self.api_key = settings.server.api_key

    def check_overrides(self, spec: CallSpec) -> None:
        """Refuse bad per-request values (400, naming the field) before the request takes a queue slot."""
        self.settings.inference.with_overrides({k: v for k, v in spec.overrides().items() if k in INFERENCE_RULES})

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
    """The Sanic app. `pipeline`, `scheduler`, `resolver` and `transport` replace the real ones (tests)."""
    server = settings.server
    # configure_logging=False: records go to the root logger only (main() sets it up), not printed twice.
    app = Sanic(name or f"deepseek_ocr_server_{next(_app_names)}", configure_logging=False)
    app.config.REQUEST_MAX_SIZE = server.max_request_bytes
    app.config.RESPONSE_TIMEOUT = RESPONSE_TIMEOUT_S
    app.config.FALLBACK_ERROR_FORMAT = "json"
    pipeline = pipeline if pipeline is not None else Pipeline(settings)
    scheduler = scheduler if scheduler is not None else Worker(pipeline, server.queue_size)
    limits = FetchLimits(timeout_s=server.image_fetch_timeout_s, max_bytes=server.image_max_bytes,
                         allow_private=server.allow_private_urls)
    loader = ImageLoader(limits, server.max_image_pixels, resolver=resolver, transport=transport)
    app.ctx.state = ServerState(settings, pipeline, scheduler, loader)
    register(app)

    @app.before_server_start
    async def _start(app: Sanic) -> None:
        # The worker thread loads the active model first, so the first request does not pay for it.
        scheduler.start(preload=[settings.active_model] if preload else [])

    @app.after_server_stop
    async def _stop(app: Sanic) -> None:
        scheduler.stop()
        await loader.close()

    return app


def _flag_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="deepseek-ocr-server",
                                     description="OpenAI-compatible HTTP server for DeepSeek-OCR and PaddleOCR-VL.")
    parser.add_argument("--config", type=Path, default=None, help="config.toml (default: the per-user one)")
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    parser.add_argument("--no-preload", action="store_true", help="load the active model on first use only")
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
        app = create_app(settings, preload=options["preload"])
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    server = settings.server
    if server.host not in ("127.0.0.1", "localhost", "::1") and not server.api_key:
        log.warning("listening on %s without an API key: anyone who can reach this port can use it", server.host)
    app.run(host=server.host, port=server.port, single_process=True, access_log=False, motd=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
