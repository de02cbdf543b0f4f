"""The ``mirror`` command line. Subcommands parse, load settings and hand over; no logic here.

Every subcommand reads the same configuration (``--config``, ``MIRROR_*``, flags) and opens
the same engine on the data dir; each adds options of its own, which are not settings.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import re
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from mirror import __version__
from mirror.cli import commands
from mirror.cli.workers import run_workers
from mirror.config import ENV_PREFIX, FLAG_KEYS, ConfigError, Settings, load
from mirror.content.protocols import NewerSchema
from mirror.domain.pins import Pin
from mirror.engine import check_store
from mirror.logs import configure
from mirror.services.bundle import repository_for_tags
from mirror.services.layout import DEFAULT_BOUNDS
from mirror.services.seed import DEFAULT_JOBS, read_list
from mirror.web.server import serve_one, server_tls, warn_at_start
from mirror.web.tls import CertificateError

EXIT_USAGE = 2
EXIT_FAILURE = 1


def _store_options() -> argparse.ArgumentParser:
    """What every subcommand needs to find the mirror's content."""
    options = argparse.ArgumentParser(add_help=False)
    options.add_argument("--config", type=Path, help="YAML config file (or MIRROR_CONFIG)")
    options.add_argument("--data-dir", help="where blobs and metadata live (default ./mirror-data)")
    options.add_argument(
        "--redis-url",
        help="redis://, rediss:// or redis+sentinel://HOST:PORT[,...]/SERVICE[/DB] URL"
        " of a shared metadata store",
    )
    options.add_argument("--redis-ca-file", help="PEM CA certificates to trust for rediss://")
    options.add_argument("--log-level", help="debug, info, warning or error")
    options.add_argument("--log-format", help="auto, json or console")
    return options


def _upstream_options() -> argparse.ArgumentParser:
    """What the subcommands that talk to upstream registries need."""
    options = argparse.ArgumentParser(add_help=False)
    options.add_argument(
        "--upstream",
        action="append",
        metavar="[NAME=]URL",
        help="upstream registry: a bare URL is docker.io's (default https://registry-1.docker.io);"
        " NAME=URL adds another registry, picked by containerd's ?ns=NAME (repeatable)",
    )
    options.add_argument("--tag-ttl", help="seconds a tag is trusted without asking upstream")
    options.add_argument("--connect-timeout", help="seconds to wait for an upstream connection")
    options.add_argument(
        "--read-timeout", help="seconds a blob download may wait for more data (default 60)"
    )
    options.add_argument(
        "--request-timeout",
        help="seconds for a manifest, token or tag-list request to the upstream (default 10)",
    )
    options.add_argument("--manifest-cache-size", help="manifests and tags kept in memory")
    options.add_argument(
        "--manifest-cache-bytes", help="memory for manifests kept in memory (default 64MiB)"
    )
    options.add_argument(
        "--max-stale", help="seconds past its window a tag may be served while upstream fails"
    )
    options.add_argument(
        "--negative-ttl", help="seconds an upstream 'not found' is remembered (default 30)"
    )
    options.add_argument(
        "--cold-lookup-rate",
        help="upstream lookups of names never seen, per upstream (10/s, 600/min, off)",
    )
    options.add_argument(
        "--ratelimit-reserve", help="stop manifest GETs when the upstream quota falls below this"
    )
    return options


def _budget_options(command: argparse.ArgumentParser) -> None:
    budget = command.add_argument_group("disk budget")
    budget.add_argument(
        "--max-cache-size",
        metavar="SIZE",
        help="evict least recently pulled blobs beyond this (500MiB, 50GiB, 10GB; default none)",
    )
    budget.add_argument(
        "--min-free-space",
        metavar="SIZE|PERCENT",
        help="also evict while the data dir's filesystem has less free (default 5%%)",
    )
    budget.add_argument(
        "--evict-unused-after",
        metavar="DURATION",
        help="evict what nobody pulled for this long (30d, 12h; default off)",
    )
    budget.add_argument(
        "--pin",
        action="append",
        dest="pins",
        metavar="REF",
        help="[registry/]repository[:tag] with * wildcards: never evicted (repeatable)",
    )


def _seed_command(
    commands: Any, store: argparse.ArgumentParser, upstream: argparse.ArgumentParser
) -> None:
    seed = commands.add_parser(
        "seed",
        help="pull images into the data dir ahead of need (safe while serve runs)",
        parents=[store, upstream],
    )
    seed.add_argument(
        "references",
        nargs="*",
        metavar="REF",
        help="images as docker pull takes them: alpine:3.20, ghcr.io/acme/tool:1.0, name@sha256:…",
    )
    seed.add_argument(
        "--file", type=Path, metavar="LIST", help="more references, one per line; # comments"
    )
    seed.add_argument(
        "--platform",
        action="append",
        dest="platforms",
        default=[],
        metavar="OS/ARCH",
        help="only these platforms of a multi-platform image (repeatable; default all)",
    )
    seed.add_argument(
        "--jobs",
        type=int,
        default=DEFAULT_JOBS,
        metavar="N",
        help=f"blobs fetched in parallel (default {DEFAULT_JOBS})",
    )
    seed.add_argument(
        "--no-pin", action="store_true", help="let eviction remove them like any pulled image"
    )
    seed.add_argument(
        "--no-referrers",
        action="store_true",
        help="without their signatures, SBOMs and attestations (referrers, cosign's tags)",
    )


def _bundle_commands(commands: Any, store: argparse.ArgumentParser) -> None:
    export = commands.add_parser(
        "export",
        help="write cached images to an OCI layout tar for an air-gapped site",
        parents=[store],
    )
    export.add_argument(
        "patterns",
        nargs="*",
        metavar="PATTERN",
        help="[registry/]repository[:tag] with * wildcards (default: every image)",
    )
    export.add_argument(
        "--output",
        "-o",
        type=Path,
        required=True,
        metavar="FILE",
        help="the bundle: FILE.tar, or FILE.tar.zst compressed; FILE.sha256 is written beside",
    )
    export.add_argument(
        "--since",
        type=Path,
        metavar="OLD_BUNDLE",
        help="a delta: only the blobs OLD_BUNDLE's images did not already need",
    )
    export.add_argument(
        "--allow-missing",
        action="store_true",
        help="write the bundle without the images whose blobs are not on disk (evicted),"
        " listed at the end; without it such an export writes nothing and exits 1",
    )
    export.add_argument(
        "--no-referrers",
        action="store_true",
        help="without the images' signatures, SBOMs and attestations (referrers, cosign's tags)",
    )
    load = commands.add_parser(
        "import",
        help="load bundles or OCI layouts (tar, tar.zst, directory); safe while serve runs",
        parents=[store],
    )
    load.add_argument("files", nargs="+", type=Path, metavar="FILE")
    load.add_argument(
        "--repository",
        metavar="NAME",
        help="the repository of images a layout names by a tag alone, as skopeo's"
        " oci-archive:FILE:1.27 does (imported as NAME:1.27)",
    )
    load.add_argument(
        "--no-pin", action="store_true", help="let eviction remove them like any pulled image"
    )
    load.add_argument(
        "--trust-held-blobs",
        action="store_true",
        help="let an image use a blob its bundle does not carry that the mirror holds for"
        " another repository (a bundle cannot prove it may read that blob)",
    )
    load.add_argument(
        "--max-expansion",
        type=_ratio,
        default=DEFAULT_BOUNDS.expansion,
        metavar="RATIO",
        help="refuse a .tar.zst that decompresses to more than RATIO times its size"
        f" (default {DEFAULT_BOUNDS.expansion:g}; 0: no bound)",
    )
    unpin = commands.add_parser(
        "unpin", help="let eviction remove images that seed or import pinned", parents=[store]
    )
    unpin.add_argument("references", nargs="+", metavar="REF", help="as seed was given them")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mirror",
        description="A pull-through cache for Docker Hub and other OCI registries. Settings "
        "come from a YAML file (--config or MIRROR_CONFIG), MIRROR_* environment variables "
        "and flags, flags winning; `mirror COMMAND --help` lists each command's.",
    )
    parser.add_argument("--version", action="version", version=f"mirror {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    store, upstream = _store_options(), _upstream_options()
    serve = commands.add_parser(
        "serve", help="run the pull-through cache", parents=[store, upstream]
    )
    serve.add_argument("--listen", help="HOST:PORT to listen on (default 0.0.0.0:5000)")
    serve.add_argument("--workers", help="processes serving the port (default 1)")
    serve.add_argument("--tls-cert", metavar="FILE", help="serve HTTPS with this certificate (PEM)")
    serve.add_argument("--tls-key", metavar="FILE", help="... and this private key (PEM)")
    serve.add_argument(
        "--client-miss-limit",
        metavar="RATE",
        help="upstream manifest fetches one client address may cause (60/min, 5/s; default off)",
    )
    serve.add_argument(
        "--client-max-transfers",
        metavar="N",
        help="blob downloads one client address may have under way (default 64)",
    )
    serve.add_argument(
        "--send-timeout",
        metavar="SECONDS",
        help="seconds a download may go without the client accepting a byte (default 60)",
    )
    serve.add_argument(
        "--event-loop", help="auto (uvloop when installed), uvloop or asyncio"
    )
    serve.add_argument(
        "--shutdown-delay",
        metavar="DURATION",
        help="on SIGTERM, keep accepting this long while /readyz answers 503",
    )
    serve.add_argument(
        "--shutdown-grace",
        metavar="DURATION",
        help="then let transfers in flight finish for up to this long",
    )
    serve.add_argument(
        "--offline",
        action="store_const",
        const=True,
        help="air-gapped: never contact an upstream; serve what is held or imported",
    )
    _budget_options(serve)
    ls = commands.add_parser(
        "ls", help="list the cached images (works while serve runs)", parents=[store]
    )
    ls.add_argument(
        "pattern",
        nargs="?",
        help="[registry/]repository[:tag] with * wildcards, e.g. 'library/postgres:16*'",
    )
    ls.add_argument("--json", action="store_true", help="JSON for scripts instead of a table")
    gc = commands.add_parser(
        "gc",
        help="remove blobs no cached image needs and leftovers of crashed downloads",
        parents=[store],
    )
    gc.add_argument("--dry-run", action="store_true", help="say what would go; remove nothing")
    verify = commands.add_parser(
        "verify", help="re-hash every cached blob and report the corrupt ones", parents=[store]
    )
    _seed_command(commands, store, upstream)
    _bundle_commands(commands, store)
    verify.add_argument(
        "--repair",
        action="store_true",
        help="take corrupt blobs out of service, so the next pull fetches them again",
    )
    _annotate(parser)
    return parser


# What each setting is when nobody sets it, as --help shows it.
_DEFAULTS = {
    "data_dir": "./mirror-data",
    "redis_url": "none: the embedded store",
    "redis_ca_file": "none: the system CAs",
    "log_level": "info",
    "log_format": "auto: JSON lines unless on a terminal",
    "upstream": "https://registry-1.docker.io",
    "tag_ttl": "300",
    "connect_timeout": "10",
    "read_timeout": "60",
    "request_timeout": "10",
    "manifest_cache_size": "4096",
    "manifest_cache_bytes": "64MiB",
    "max_stale": "no limit",
    "negative_ttl": "30",
    "cold_lookup_rate": "10/s",
    "ratelimit_reserve": "0",
    "listen": "0.0.0.0:5000",
    "workers": "1",
    "tls_cert": "none: plain HTTP",
    "tls_key": "none",
    "client_miss_limit": "off",
    "client_max_transfers": "64",
    "send_timeout": "60",
    "offline": "off",
    "event_loop": "auto",
    "shutdown_delay": "5s",
    "shutdown_grace": "30s",
    "max_cache_size": "none",
    "min_free_space": "5%",
    "evict_unused_after": "off",
    "pins": "none",
}
_DEFAULT_RE = re.compile(r"\s*\(default [^)]*\)|;\s*default [^)]*(?=\))")


def _annotate(parser: argparse.ArgumentParser) -> None:
    """Every setting's help ends with its default and its environment variable, the same
    way everywhere, so --help is the reference and no help text repeats a default."""
    # argparse lists a parser's arguments only in private ``_actions``; help is the reference.
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for command in action.choices.values():
                _annotate(command)
        elif (
            action.dest in FLAG_KEYS
            and action.help not in (None, argparse.SUPPRESS)
            and "[default:" not in str(action.help)  # parents share their actions
        ):
            text = _DEFAULT_RE.sub("", str(action.help)).replace("%%", "%")
            default = _DEFAULTS.get(action.dest, "none")
            env = f"{ENV_PREFIX}{action.dest.upper()}"
            action.help = f"{text} [default: {default}; env {env}]".replace("%", "%%")


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    values = vars(args)
    flags: dict[str, Any] = {
        key: value for key, value in values.items() if key in FLAG_KEYS and value is not None
    }
    try:
        settings = load(flags, config_file=args.config)
        pattern = Pin.parse(args.pattern) if getattr(args, "pattern", None) else None
    except (ConfigError, ValueError) as exc:
        print(f"mirror: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    if args.command == "serve":
        return serve(settings)
    try:
        if args.command == "ls":
            return asyncio.run(commands.ls(settings, pattern, as_json=args.json))
        return _COMMANDS[args.command](settings, args)
    except NewerSchema as exc:  # gc, verify, seed, ... touch nothing of a newer release's
        print(f"mirror: error: {exc}", file=sys.stderr)
        return EXIT_FAILURE


def _gc(settings: Settings, args: argparse.Namespace) -> int:
    return asyncio.run(commands.gc(settings, dry_run=args.dry_run))


def _verify(settings: Settings, args: argparse.Namespace) -> int:
    return asyncio.run(commands.verify(settings, repair=args.repair))


def _seed(settings: Settings, args: argparse.Namespace) -> int:
    references = list(args.references)
    try:
        if args.file is not None:
            references += read_list(args.file)
    except OSError as exc:
        print(f"mirror: error: cannot read {args.file}: {exc.strerror}", file=sys.stderr)
        return EXIT_USAGE
    if not references:
        print("mirror: error: seed needs image references (REF ... or --file)", file=sys.stderr)
        return EXIT_USAGE
    if args.jobs < 1:
        print("mirror: error: --jobs must be at least 1", file=sys.stderr)
        return EXIT_USAGE
    return asyncio.run(
        commands.seed_images(
            settings,
            references,
            platforms=args.platforms,
            jobs=args.jobs,
            pin=not args.no_pin,
            referrers=not args.no_referrers,
        )
    )


def serve(settings: Settings) -> int:
    configure(settings.log_level, settings.log_format)
    try:
        server_tls(settings)  # a certificate that cannot serve stops here, in one line
    except CertificateError as exc:
        print(f"mirror: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    warn_at_start(settings)
    try:
        asyncio.run(check_store(settings))  # before any worker: one line, not one per worker
        if settings.workers > 1:
            return run_workers(settings, settings.workers)
        return serve_one(settings)
    except (OSError, NewerSchema) as exc:
        # The port is taken, the data dir unusable, or the store a newer release's: say so
        # in one line, not a traceback.
        print(f"mirror: error: {exc}", file=sys.stderr)
        return EXIT_FAILURE


def _export(settings: Settings, args: argparse.Namespace) -> int:
    try:
        patterns = [Pin.parse(text) for text in args.patterns]
    except ValueError as exc:
        print(f"mirror: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    return asyncio.run(
        commands.export_bundle(
            settings,
            args.output,
            patterns,
            since=args.since,
            allow_missing=args.allow_missing,
            referrers=not args.no_referrers,
        )
    )


def _import(settings: Settings, args: argparse.Namespace) -> int:
    for path in args.files:
        if not path.exists():
            print(f"mirror: error: {path}: no such file or directory", file=sys.stderr)
            return EXIT_USAGE
    try:
        repository = None if args.repository is None else repository_for_tags(args.repository)
    except ValueError as exc:
        print(f"mirror: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    return asyncio.run(
        commands.import_bundles(
            settings,
            args.files,
            pin=not args.no_pin,
            repository=repository,
            trust_held_blobs=args.trust_held_blobs,
            bounds=dataclasses.replace(DEFAULT_BOUNDS, expansion=args.max_expansion),
        )
    )


def _ratio(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value >= 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"{text!r} is not a ratio (a number, 0 or more)")
    return value


def _unpin(settings: Settings, args: argparse.Namespace) -> int:
    try:
        return asyncio.run(commands.unpin(settings, args.references))
    except ValueError as exc:
        print(f"mirror: error: {exc}", file=sys.stderr)
        return EXIT_USAGE


_COMMANDS: dict[str, Callable[[Settings, argparse.Namespace], int]] = {
    "unpin": _unpin,
    "gc": _gc,
    "verify": _verify,
    "seed": _seed,
    "export": _export,
    "import": _import,
}


if __name__ == "__main__":
    sys.exit(main())
