"""``tome-serve``: validate the settings, then run the supervisor (engine + front-ends) on one port.

``tome-serve calibrate ...`` measures a model's tiers on your images instead (service/calibrate.py).

The first SIGTERM/SIGINT drains: /readyz turns 503, new classify requests get 503, every admitted
request is answered, then every process exits. A second signal exits at once.
"""

from __future__ import annotations

import os

# libgomp reads this once, when torch loads it in the engine process (which inherits this environment).
# Idle OpenMP workers then sleep instead of spinning: with ACTIVE an idle CPU replica kept a whole core
# busy (tests/service/test_server.py checks it stays idle); against libgomp's default no difference beyond
# noise was measured (BENCHMARKS.md).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import sys

from pydantic import ValidationError

from .lifecycle.process import configure_logging
from .lifecycle.supervisor import Supervisor
from .settings import CONFIG_FILE_ENV, load_settings


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="tome-serve", description=__doc__.splitlines()[0])
    parser.add_argument("--config", help=f"TOML or YAML settings file (or ${CONFIG_FILE_ENV})")
    parser.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument(
        "--workers", type=int, help="front-end processes (default: server.workers, 0 = one per core)"
    )
    parser.add_argument("--log-level", default="info")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["calibrate"]:
        from .calibrate import main as calibrate  # torch and timm: only for this command

        return calibrate(argv[1:])
    args = parse_args(argv)
    configure_logging("supervisor", args.log_level)
    try:
        overrides = {"server": {"workers": args.workers}} if args.workers is not None else {}
        settings = load_settings(args.config)
        if overrides:
            settings = settings.model_copy(
                update={"server": settings.server.model_copy(update=overrides["server"])}
            )
    except (ValidationError, FileNotFoundError, ValueError) as e:
        print(f"tome-serve: cannot start: {e}", file=sys.stderr)
        return 2
    return Supervisor(settings, args.host, args.port, args.log_level).run()


if __name__ == "__main__":
    sys.exit(main())
