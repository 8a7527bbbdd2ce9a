"""``token-broker`` commands: serve, check-config, healthcheck, hash-key, consent-url, probe, cache purge.

Errors go to stderr with a non-zero exit: 2 for a bad configuration or usage, 1 for a failed
operation (``healthcheck`` exits 0 or 1 only: Docker reserves 2). ``probe`` never prints the token
unless ``--show-token`` is given.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Coroutine, Sequence
from typing import Any

from broker import __version__
from broker.callers import new_api_key
from broker.config import Settings, is_tenant, load_settings, normalise_resource
from broker.errors import BrokerError, ConfigError

EXIT_FAILED = 1
EXIT_CONFIG = 2


def _run(coro: Coroutine[Any, Any, Any]) -> Any:
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    return uvloop.run(coro)


def _settings(args: argparse.Namespace, *, check_files: bool = True) -> Settings:
    settings = load_settings(args.config, check_files=check_files)
    overrides: dict[str, Any] = {}
    if getattr(args, "host", None) or getattr(args, "port", None) is not None:
        overrides["listen"] = settings.listen.model_copy(
            update={k: v for k, v in (("host", args.host), ("port", args.port)) if v is not None}
        )
    if getattr(args, "metrics_port", None) is not None:
        overrides["metrics"] = settings.metrics.model_copy(update={"port": args.metrics_port})
    return settings.model_copy(update=overrides) if overrides else settings


def _pick_app(settings: Settings, name: str | None) -> str:
    found = settings.app_for(name)
    if found is None:
        raise ConfigError(
            f"unknown app {name!r}" if name else f"--app is required: one of {', '.join(settings.apps)}"
        )
    return found[0]


def cmd_serve(args: argparse.Namespace) -> int:
    from broker.app import serve
    from broker.logs import configure_logging

    settings = _settings(args)
    configure_logging(settings.log_level)
    try:
        _run(serve(settings))
    except OSError as exc:  # the listen address is taken or not ours to bind
        print(f"token-broker: cannot listen: {exc.strerror or exc}", file=sys.stderr)
        return EXIT_FAILED
    return 0


def cmd_check_config(args: argparse.Namespace) -> int:
    settings = _settings(args)
    print(
        f"config OK: {len(settings.apps)} app(s), {len(settings.callers)} caller(s), "
        f"cache: {'redis' if settings.redis_url else 'in-process'}"
    )
    return 0


# Where a local client reaches a listener bound to a wildcard address.
_LOOPBACK_FOR = {"": "127.0.0.1", "0.0.0.0": "127.0.0.1", "::": "::1"}  # noqa: S104 - matched, not bound


def cmd_healthcheck(args: argparse.Namespace) -> int:
    """Exit 0 when the broker on this host answers ``/healthz`` on the port its configuration (file,
    ``BROKER_*`` overrides) gives, else 1: the image's HEALTHCHECK, which must follow the configured
    port rather than assume 8080."""
    try:
        # The files the configuration names were checked when the broker started; only the address
        # matters here.
        settings = _settings(args, check_files=False)
    except ConfigError as exc:
        print(f"token-broker: config error: {exc}", file=sys.stderr)
        return EXIT_FAILED  # not EXIT_CONFIG: Docker reserves exit code 2 for healthchecks
    host = _LOOPBACK_FOR.get(settings.listen.host, settings.listen.host)
    url = f"http://{f'[{host}]' if ':' in host else host}:{settings.listen.port}/healthz"
    try:
        with urllib.request.urlopen(url, timeout=args.timeout) as response:
            status = int(response.status)
    except urllib.error.HTTPError as exc:
        status = exc.code
    except (OSError, ValueError) as exc:
        print(f"token-broker: {url} unreachable: {exc}", file=sys.stderr)
        return EXIT_FAILED
    if status != 200:
        print(f"token-broker: {url} answered {status}", file=sys.stderr)
        return EXIT_FAILED
    return 0


def cmd_hash_key(args: argparse.Namespace) -> int:
    key, digest = new_api_key()
    if args.export:
        print(f"export BROKER_CALLER_KEY={key}")
        print(f"export BROKER_CALLER_KEY_SHA256={digest}")
    else:
        print(f"api key (give it to the caller, store it nowhere else): {key}")
        print(f"api_key_sha256 (put it in the config):                 {digest}")
    return 0


def cmd_consent_url(args: argparse.Namespace) -> int:
    from broker.entra import consent_url

    settings = _settings(args)
    app = _pick_app(settings, args.app)
    tenant = args.tenant or "organizations"
    if tenant != "organizations" and not is_tenant(tenant):
        raise ConfigError("--tenant must be a tenant GUID or domain")
    resources = settings.apps[app].resources
    resource = normalise_resource(args.resource) if args.resource else resources[0]
    print(
        consent_url(
            settings.authority_host,
            tenant,
            settings.apps[app].client_id,
            resource,
            redirect_uri=args.redirect_uri,
            state=args.state,
        )
    )
    return 0


async def _probe(settings: Settings, app: str, tenant: str, resource: str) -> Any:
    from broker.entra import EntraClient
    from broker.metrics import Metrics
    from broker.tls import build_ca_bundle
    from broker.tokens import TokenKey
    from broker.vault import CredentialStore

    metrics = Metrics()
    ca_bundle = build_ca_bundle(settings.outbound_ca_file)
    async with CredentialStore(settings, metrics, ca_bundle) as credentials:
        entra = EntraClient(settings.entra_options(), metrics, credentials, ca_bundle)
        try:
            return await entra.acquire(TokenKey(app, tenant.lower(), resource))
        finally:
            entra.close()


def cmd_probe(args: argparse.Namespace) -> int:
    from broker.tokens import decode_claims

    settings = _settings(args)
    app = _pick_app(settings, args.app)
    if not is_tenant(args.tenant):
        raise ConfigError("--tenant must be a tenant GUID or domain")
    resource = normalise_resource(args.resource)
    try:
        token = _run(_probe(settings, app, args.tenant, resource))
    except BrokerError as exc:
        print(json.dumps(exc.to_body(), indent=2), file=sys.stderr)
        return EXIT_FAILED
    claims = decode_claims(token.token)
    missing = token.missing_roles(tuple(args.roles))
    report = {
        "tenant_id": claims.get("tid"),
        "audience": claims.get("aud"),
        "app_id": claims.get("appid") or claims.get("azp"),
        "roles": list(token.roles),
        "expires_on": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(token.expires_on)),
        "expires_in": int(token.remaining_seconds()),
        "token_fingerprint": token.fingerprint,
        "uti": token.uti,
    }
    if args.show_token:
        report["access_token"] = token.token
    print(json.dumps(report, indent=2))
    if missing:
        print(f"missing roles: {', '.join(missing)}", file=sys.stderr)
        return EXIT_FAILED
    return 0


def cmd_cache_purge(args: argparse.Namespace) -> int:
    from broker.cache import purge_tenant
    from broker.errors import SharedCacheError

    settings = _settings(args)
    if not is_tenant(args.tenant):
        raise ConfigError("--tenant must be a tenant GUID or domain")
    options = settings.redis_options()
    if options is None:
        raise ConfigError("redis_url is not configured: there is no shared cache to purge")
    from broker.app import entra_redis_credentials
    from broker.tls import build_ca_bundle

    async def purge() -> tuple[int, int]:
        credentials = entra_redis_credentials(settings, build_ca_bundle(settings.outbound_ca_file))
        try:
            return await purge_tenant(options, args.tenant, credentials=credentials)
        finally:
            if credentials is not None:
                await credentials.close()

    try:
        removed, notified = _run(purge())
    except SharedCacheError as exc:
        print(f"token-broker: cannot reach Redis: {exc}", file=sys.stderr)
        return EXIT_FAILED
    print(
        f"removed {removed} shared cache entr{'y' if removed == 1 else 'ies'} for {args.tenant}; "
        f"{notified} replica(s) dropped their in-process copies"
    )
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="token-broker",
        description="Hands internal callers Entra ID app tokens for customer tenants.",
    )
    parser.add_argument("--version", action="version", version=f"token-broker {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    def with_config(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
        p.add_argument(
            "--config", help="YAML configuration file (default: $BROKER_CONFIG, else the embedded defaults)"
        )
        return p

    serve = with_config(sub.add_parser("serve", help="run the HTTP service"))
    serve.add_argument("--host", help="override listen.host")
    serve.add_argument("--port", type=int, help="override listen.port")
    serve.add_argument("--metrics-port", type=int, help="override metrics.port")
    serve.set_defaults(func=cmd_serve)

    check = with_config(sub.add_parser("check-config", help="validate the configuration and exit"))
    check.set_defaults(func=cmd_check_config)

    health = with_config(
        sub.add_parser("healthcheck", help="exit 0 when the local broker answers /healthz (HEALTHCHECK)")
    )
    health.add_argument("--timeout", type=float, default=3.0, help="seconds to wait for the answer")
    health.set_defaults(func=cmd_healthcheck)

    hash_key = sub.add_parser("hash-key", help="make a new caller API key and its config hash")
    hash_key.add_argument("--export", action="store_true", help="print as shell export lines")
    hash_key.set_defaults(func=cmd_hash_key)

    consent = with_config(sub.add_parser("consent-url", help="print the admin-consent link"))
    consent.add_argument("--tenant", help="customer tenant GUID or domain (default: organizations)")
    consent.add_argument("--app", help="configured app name (required with several apps)")
    consent.add_argument("--resource", help="resource to consent for (default: the app's first)")
    consent.add_argument("--redirect-uri", help="where Entra sends the admin after consent")
    consent.add_argument("--state", help="opaque value to check on the redirect")
    consent.set_defaults(func=cmd_consent_url)

    probe = with_config(sub.add_parser("probe", help="acquire a token and show its claims"))
    probe.add_argument("--tenant", required=True, help="customer tenant GUID or domain")
    probe.add_argument("--resource", required=True, help="e.g. https://api.security.microsoft.com")
    probe.add_argument("--app", help="configured app name (required with several apps)")
    probe.add_argument("--roles", nargs="*", default=[], help="roles the token must carry")
    probe.add_argument("--show-token", action="store_true", help="also print the access token")
    probe.set_defaults(func=cmd_probe)

    cache = sub.add_parser("cache", help="shared cache maintenance")
    cache_sub = cache.add_subparsers(dest="cache_command", required=True)
    purge = with_config(cache_sub.add_parser("purge", help="forget a tenant's cached tokens"))
    purge.add_argument("--tenant", required=True, help="customer tenant GUID or domain")
    purge.set_defaults(func=cmd_cache_purge)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except ConfigError as exc:
        print(f"token-broker: config error: {exc}", file=sys.stderr)
        return EXIT_CONFIG


if __name__ == "__main__":
    sys.exit(main())
