"""``token-broker`` commands: serve, check-config, healthcheck, hash-key, consent-url, probe, cache purge,
tenants list|show|check|remove|invite.

Errors go to stderr with a non-zero exit: 2 for a bad configuration or usage, 1 for a failed
operation (``healthcheck`` exits 0 or 1 only: Docker reserves 2). ``probe`` never prints the token
unless ``--show-token`` is given. ``tenants`` commands are clients of a running broker's admin API
(``/v1/tenants``), authenticated with an admin caller's key from an environment variable (never an
argument: arguments show in ``ps``); they print tables for people and ``--json`` for scripts.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Coroutine, Sequence
from typing import TYPE_CHECKING, Any

from broker import __version__
from broker.callers import new_api_key
from broker.config import (
    GUID_RE,
    RedisOptions,
    Settings,
    is_tenant,
    load_settings,
    normalise_resource,
    read_env_secret,
)
from broker.errors import BrokerError, ConfigError

if TYPE_CHECKING:
    from broker.cache import EntraRedisCredentials

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


async def _tenant_guid(settings: Settings, domain: str) -> str:
    """The GUID a domain names, from Entra's discovery document (as the broker resolves it)."""
    from broker.discovery import TenantDiscovery
    from broker.tls import build_ca_bundle

    discovery = TenantDiscovery(
        settings.authority_host, build_ca_bundle(settings.outbound_ca_file), settings.upstream_timeout_seconds
    )
    try:
        return await discovery.tenant_id(domain)
    finally:
        await discovery.close()


async def _purge(
    options: RedisOptions, spellings: list[str], credentials: EntraRedisCredentials | None
) -> tuple[int, int]:
    from broker.cache import purge_tenant

    removed = notified = 0
    for spelling in spellings:
        count, heard = await purge_tenant(options, spelling, credentials=credentials)
        removed, notified = removed + count, max(notified, heard)
    return removed, notified


def cmd_cache_purge(args: argparse.Namespace) -> int:
    from broker.errors import SharedCacheError

    settings = _settings(args)
    if not is_tenant(args.tenant):
        raise ConfigError("--tenant must be a tenant GUID or domain")
    options = settings.redis_options()
    if options is None:
        raise ConfigError("redis_url is not configured: there is no shared cache to purge")
    from broker.app import entra_redis_credentials
    from broker.tls import build_ca_bundle

    spellings = [args.tenant.lower()]
    if not GUID_RE.fullmatch(args.tenant):
        # Entries are keyed by the tenant's GUID; entries under the domain itself predate that.
        try:
            spellings.insert(0, _run(_tenant_guid(settings, args.tenant.lower())))
        except BrokerError as exc:
            print(f"token-broker: cannot resolve {args.tenant}: {exc.description}", file=sys.stderr)
            return EXIT_FAILED

    async def purge() -> tuple[int, int]:
        credentials = entra_redis_credentials(settings, build_ca_bundle(settings.outbound_ca_file))
        try:
            return await _purge(options, spellings, credentials)
        finally:
            if credentials is not None:
                await credentials.close()

    try:
        removed, notified = _run(purge())
    except SharedCacheError as exc:
        print(f"token-broker: cannot reach Redis: {exc}", file=sys.stderr)
        return EXIT_FAILED
    print(
        f"removed {removed} shared cache entr{'y' if removed == 1 else 'ies'} for {' / '.join(spellings)}; "
        f"{notified} replica(s) dropped their in-process copies"
    )
    return 0


# --- tenants invite (the `tenants` group's other commands live beside it, each self-contained) ---------


async def _invite(settings: Settings, tenant: str, app: str | None, resource: str | None) -> dict[str, str]:
    from broker.metrics import Metrics
    from broker.onboarding import (
        GuidTenantResolver,
        LinkSigner,
        invite_target,
        new_invite_link,
        parse_signing_key,
    )
    from broker.tls import build_ca_bundle
    from broker.vault import CredentialStore

    options = settings.onboarding_options()
    if options is None:
        raise ConfigError("public_base_url is not configured: onboarding is off")
    guid = await GuidTenantResolver().resolve(tenant)
    app_name, chosen = invite_target(options, app, resource)
    async with CredentialStore(
        settings, Metrics(), build_ca_bundle(settings.outbound_ca_file)
    ) as credentials:
        key_text = await credentials.consent_signing_key_text()
    if key_text is None:  # not reached: parse_settings requires the key with public_base_url
        raise ConfigError("consent_signing_key is not configured")
    signer = LinkSigner(parse_signing_key(key_text))
    return new_invite_link(options, signer, guid, app_name, chosen).as_json()


def cmd_tenants_invite(args: argparse.Namespace) -> int:
    """Print a signed onboarding link for the tenant's Global Administrator (as the invite endpoint
    does), signed here with the configured ``consent_signing_key``."""
    settings = _settings(args)
    try:
        link = _run(_invite(settings, args.tenant, args.app, args.resource))
    except BrokerError as exc:
        print(f"token-broker: {exc.description}", file=sys.stderr)
        return EXIT_FAILED
    print(json.dumps(link, indent=2))
    return 0


def add_tenants_invite(tenants_sub: Any, with_config: Any) -> None:
    invite = with_config(
        tenants_sub.add_parser("invite", help="a signed admin-consent invite link for a tenant")
    )
    invite.add_argument("tenant", help="customer tenant GUID")
    invite.add_argument("--app", help="configured app name (required with several apps)")
    invite.add_argument("--resource", help="API to consent for (default: the app's first resource)")
    invite.set_defaults(func=cmd_tenants_invite)


# --- tenants: a client of the admin API ------------------------------------------------------------

ADMIN_KEY_ENV = "BROKER_ADMIN_KEY"


class _AdminError(Exception):
    """The admin API refused or could not be reached; the message is for stderr."""


def _admin_url(args: argparse.Namespace) -> str:
    if args.url:
        return str(args.url).rstrip("/")
    settings = _settings(args, check_files=False)
    host = _LOOPBACK_FOR.get(settings.listen.host, settings.listen.host)
    return f"http://{f'[{host}]' if ':' in host else host}:{settings.listen.port}"


def _admin_call(args: argparse.Namespace, method: str, path: str) -> Any:
    """One admin API request; the decoded JSON answer, or ``_AdminError``."""
    key = read_env_secret(args.key_env)
    if not key:
        raise ConfigError(f"set {args.key_env} to the key of a caller with admin: true")
    url = _admin_url(args) + path
    request = urllib.request.Request(  # noqa: S310 - the operator's own broker URL (http or https)
        url, method=method, headers={"Authorization": f"Bearer {key}", "Accept": "application/json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=args.timeout) as response:  # noqa: S310 - as above
            return json.loads(response.read())
    except urllib.error.HTTPError as exc:
        try:
            body = json.loads(exc.read())
            reason = f"{body.get('error')}: {body.get('error_description')}"
        except ValueError:
            reason = exc.reason
        raise _AdminError(f"{method} {path} answered {exc.code} {reason}") from None
    except (OSError, ValueError) as exc:
        raise _AdminError(f"{url} unreachable: {exc}") from None


def _table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(str(row[i])) for row in [header, *rows]) for i in range(len(header))]
    return "\n".join(
        "  ".join(str(cell).ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        for row in [header, *rows]
    )


def _key_rows(entry: dict[str, Any]) -> list[list[str]]:
    rows = []
    for app, resources in sorted(entry["apps"].items()):
        for resource, key in sorted(resources.items()):
            error = key.get("last_error") or {}
            rows.append(
                [
                    app,
                    resource,
                    str(key.get("state")),
                    ",".join(key.get("missing_roles") or []) or "-",
                    str(key.get("last_checked_at") or "-"),
                    str(error.get("aadsts") or error.get("error") or "-"),
                ]
            )
    return rows


_KEY_HEADER = ["APP", "RESOURCE", "STATE", "MISSING ROLES", "LAST CHECKED", "LAST ERROR"]


def cmd_tenants_list(args: argparse.Namespace) -> int:
    query = {"limit": str(args.limit), **({"state": args.state} if args.state else {})}
    if args.app:
        query["app"] = args.app
    found: list[dict[str, Any]] = []
    cursor = ""
    while True:
        page = _admin_call(
            args,
            "GET",
            "/v1/tenants?" + urllib.parse.urlencode({**query, **({"cursor": cursor} if cursor else {})}),
        )
        found.extend(page["tenants"])
        cursor = page.get("next_cursor") or ""
        if not cursor:
            break
    if args.json:
        print(json.dumps({"tenants": found}, indent=2))
        return 0
    rows = [
        [
            entry["tenant"],
            str(entry.get("state")),
            ",".join(entry.get("domains") or []) or "-",
            ",".join(sorted(entry["apps"])),
        ]
        for entry in found
    ]
    print(_table(rows, ["TENANT", "STATE", "DOMAINS", "APPS"]))
    print(f"{len(found)} tenant(s)")
    return 0


def cmd_tenants_show(args: argparse.Namespace) -> int:
    entry = _admin_call(args, "GET", f"/v1/tenants/{urllib.parse.quote(args.tenant)}")
    if args.json:
        print(json.dumps(entry, indent=2))
        return 0
    print(f"tenant     {entry['tenant']} ({entry.get('state')})")
    print(f"domains    {', '.join(entry.get('domains') or []) or '-'}")
    print(f"first seen {entry.get('first_seen') or '-'}")
    print(_table(_key_rows(entry), _KEY_HEADER))
    return 0


def cmd_tenants_check(args: argparse.Namespace) -> int:
    query = f"?app={urllib.parse.quote(args.app)}" if args.app else ""
    result = _admin_call(args, "POST", f"/v1/tenants/{urllib.parse.quote(args.tenant)}/check{query}")
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        rows = [
            [check["app"], check["resource"], check["outcome"], str(check.get("aadsts") or "-")]
            for check in result["checks"]
        ]
        print(f"tenant {result['tenant']}")
        print(_table(rows, ["APP", "RESOURCE", "OUTCOME", "AADSTS"]))
        if result.get("entry"):
            print(_table(_key_rows(result["entry"]), _KEY_HEADER))
    return 0 if all(check["outcome"] == "ok" for check in result["checks"]) else EXIT_FAILED


def cmd_tenants_remove(args: argparse.Namespace) -> int:
    result = _admin_call(args, "DELETE", f"/v1/tenants/{urllib.parse.quote(args.tenant)}")
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    removed = result["removed"]
    counts = ", ".join(f"{value} {name}" for name, value in removed.items() if isinstance(value, int))
    domains = removed.get("domains") or []
    print(f"removed tenant {result['tenant']}: {counts or 'nothing shared'}")
    if domains:
        print(f"domain mappings removed: {', '.join(domains)}")
    print(f"{result['replicas_notified']} replica(s) dropped their in-process copies")
    return 0


def _tenants_command(command: Any) -> Any:
    """Run a tenants command, turning an admin API failure into exit 1 with the reason on stderr."""

    def run(args: argparse.Namespace) -> int:
        try:
            return int(command(args))
        except _AdminError as exc:
            print(f"token-broker: {exc}", file=sys.stderr)
            return EXIT_FAILED

    return run


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

    tenants = sub.add_parser(
        "tenants",
        help="customer tenants: the registry of a running broker (admin API) and onboarding invites",
    )
    tenants_sub = tenants.add_subparsers(dest="tenants_command", required=True)

    def admin_client(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
        with_config(p)
        p.add_argument("--url", help="the broker's base URL (default: its configured listen address)")
        p.add_argument(
            "--key-env",
            default=ADMIN_KEY_ENV,
            help=f"environment variable holding an admin caller's API key (default {ADMIN_KEY_ENV})",
        )
        p.add_argument("--timeout", type=float, default=60.0, help="seconds to wait for an answer")
        p.add_argument("--json", action="store_true", help="print the API's JSON instead of a table")
        return p

    listing = admin_client(tenants_sub.add_parser("list", help="registered tenants and their state"))
    listing.add_argument("--state", help="only tenants with an entry in this state (e.g. consent_required)")
    listing.add_argument("--app", help="only tenants with an entry for this app")
    listing.add_argument("--limit", type=int, default=500, help="tenants per API page (at most 500)")
    listing.set_defaults(func=_tenants_command(cmd_tenants_list))
    show = admin_client(tenants_sub.add_parser("show", help="one tenant's registry entry"))
    show.add_argument("tenant", help="tenant GUID or domain")
    show.set_defaults(func=_tenants_command(cmd_tenants_show))
    check_tenant = admin_client(tenants_sub.add_parser("check", help="re-acquire now (exit 1 unless all ok)"))
    check_tenant.add_argument("tenant", help="tenant GUID or domain")
    check_tenant.add_argument("--app", help="only this app (default: every app)")
    check_tenant.set_defaults(func=_tenants_command(cmd_tenants_check))
    remove = admin_client(tenants_sub.add_parser("remove", help="offboard: remove every trace of a tenant"))
    remove.add_argument("tenant", help="tenant GUID or domain")
    remove.set_defaults(func=_tenants_command(cmd_tenants_remove))
    add_tenants_invite(tenants_sub, with_config)
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
