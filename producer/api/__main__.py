"""Serve the HTTP API: `python -m producer.api --redis redis://HOST:6379/0 --host 0.0.0.0 --port 8000`.

Every setting also reads from its CHAT_* variable (CHAT_API_KEYS, CHAT_RATE_LIMIT_PER_MIN,
CHAT_MAX_QUEUE_DEPTH, ...: producer/api/config.py). `--hash-key KEY` prints the digest to put in
CHAT_API_KEYS and exits.
"""

from __future__ import annotations

import argparse
import logging
import sys

from config.settings import ConfigError


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m producer.api", description=__doc__.split("\n")[0])
    ap.add_argument("--redis", dest="redis_url",
                    help="Redis URL, or a sentinel:// list with CHAT_REDIS_MASTER_NAME (CHAT_REDIS_URL)")
    ap.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    ap.add_argument("--port", type=int, default=8000)
    ap.add_argument("--loglevel", default="INFO")
    ap.add_argument("--hash-key", metavar="KEY", help="print the sha256 digest of an API key and exit")
    args = ap.parse_args(argv)
    if args.hash_key is not None:
        from producer.api.auth import hash_key

        print(hash_key(args.hash_key))
        return 0
    logging.basicConfig(level=args.loglevel.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from producer.api.app import create_app
    from producer.api.config import load_api_settings
    from producer.api.server import make_server

    try:
        settings = load_api_settings(**({"redis_url": args.redis_url} if args.redis_url else {}))
        app = create_app(settings)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    make_server(app, args.host, args.port, args.loglevel.lower(), settings.api_shutdown_grace_s).run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
