"""``bitdelta keys create|list|revoke`` and ``bitdelta audit``: the key and audit endpoints of a
running service over HTTP, with the admin token (``--token`` or ``$BITDELTA_ADMIN_TOKEN``).

Hook into a parser with :func:`add_access_commands` (``sub`` is the ``add_subparsers`` object).
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from .audit import ACTIONS


def add_access_commands(sub: argparse._SubParsersAction) -> None:
    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("--url", required=True, help="service base URL, e.g. http://127.0.0.1:8000")
        p.add_argument("--token", help="admin bearer token (default: $BITDELTA_ADMIN_TOKEN)")
        p.add_argument("--json", action="store_true", help="print the JSON answer")

    keys = sub.add_parser("keys", help="create, list and revoke scoped API keys of a running service (admin)",
                          description="API keys give tenants access to the models their scopes match "
                                      "(names or globs such as 'acme-*'), optionally rate-limited and expiring.")
    ksub = keys.add_subparsers(dest="keys_command", required=True, metavar="ACTION")

    p = ksub.add_parser("create", help="create a key; its token is printed once and never stored")
    common(p)
    p.add_argument("--name", required=True, help="a label for people (the tenant, the app)")
    p.add_argument("--scope", dest="scopes", action="append", required=True, metavar="PATTERN",
                   help="model name or glob (* and ?) the key may use; repeat for several")
    p.add_argument("--requests-per-s", type=float, help="rate limit: sustained requests per second (per replica)")
    p.add_argument("--requests-burst", type=float, help="requests allowed at once (default: one second's worth)")
    p.add_argument("--inputs-per-s", type=float, help="rate limit: sustained classified inputs per second (per replica)")
    p.add_argument("--inputs-burst", type=float, help="inputs allowed at once; also the most per request")
    exp = p.add_mutually_exclusive_group()
    exp.add_argument("--expires-at", help="ISO-8601 time with a zone, e.g. 2027-01-01T00:00:00Z")
    exp.add_argument("--expires-in-s", type=float, help="seconds from now")
    p.add_argument("--manage", action=argparse.BooleanOptionalAction, default=False,
                   help="may also register, replace and delete models its scopes match")
    p.set_defaults(func=_cmd_keys_create)

    p = ksub.add_parser("list", help="list keys (never their secrets)")
    common(p)
    p.set_defaults(func=_cmd_keys_list)

    p = ksub.add_parser("revoke", help="revoke a key; every replica refuses it at its next request")
    common(p)
    p.add_argument("key_id", metavar="KEY_ID", help="the key's id (12 hex digits, from 'keys list')")
    p.set_defaults(func=_cmd_keys_revoke)

    p = sub.add_parser("audit", help="read the audit trail of admin actions of a running service (admin)")
    common(p)
    p.add_argument("--limit", type=int, default=100, help="newest N entries (default 100)")
    p.add_argument("--actor", help="'admin' or a key id")
    p.add_argument("--action", choices=ACTIONS)
    p.add_argument("--model")
    p.add_argument("--key-id")
    p.add_argument("--since", help="ISO-8601 time: entries at or after it")
    p.set_defaults(func=_cmd_audit)


def _run(args, fn) -> int:
    from .client import AccessClient, ServiceError

    try:
        with AccessClient(args.url, admin_token=args.token) as c:
            out = fn(c)
    except ServiceError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(out, indent=2))
    return 0 if out is not None else 1


def _fmt_limit(rl: dict[str, Any] | None) -> str:
    if not rl:
        return "-"
    parts = []
    if rl.get("requests_per_s"):
        parts.append(f"{rl['requests_per_s']:g} req/s (burst {rl['requests_burst']:g})")
    if rl.get("inputs_per_s"):
        parts.append(f"{rl['inputs_per_s']:g} inputs/s (burst {rl['inputs_burst']:g})")
    return ", ".join(parts)


def _cmd_keys_create(args) -> int:
    rate = {k: getattr(args, k) for k in ("requests_per_s", "requests_burst", "inputs_per_s", "inputs_burst")
            if getattr(args, k) is not None}

    def go(c):
        k = c.create_key(args.name, args.scopes, rate_limit=rate or None, expires_at=args.expires_at,
                         expires_in_s=args.expires_in_s, manage=args.manage)
        if not args.json:
            print(f"created key {k['id']} ({k['name']}) scopes={','.join(k['scopes'])} "
                  f"limit={_fmt_limit(k['rate_limit'])} expires={k['expires_at'] or 'never'}")
            print("token (shown once; store it now, the server keeps only its hash):")
            print(k["token"])
        return k

    return _run(args, go)


def _cmd_keys_list(args) -> int:
    def go(c):
        keys = c.list_keys()
        if not args.json:
            print(f"{'id':<13} {'name':<20} {'status':<8} {'scopes':<30} {'limit':<40} expires")
            for k in keys:
                print(f"{k['id']:<13} {k['name'][:20]:<20} {k['status']:<8} {','.join(k['scopes'])[:30]:<30} "
                      f"{_fmt_limit(k['rate_limit'])[:40]:<40} {k['expires_at'] or '-'}")
        return {"keys": keys}

    return _run(args, go)


def _cmd_keys_revoke(args) -> int:
    def go(c):
        k = c.revoke_key(args.key_id)
        if not args.json:
            print(f"revoked key {k['id']} ({k['name']}) at {k['revoked_at']}")
        return k

    return _run(args, go)


def _cmd_audit(args) -> int:
    def go(c):
        entries = c.audit(limit=args.limit, actor=args.actor, action=args.action, model=args.model,
                          key_id=args.key_id, since=args.since)
        if not args.json:
            for e in entries:
                what = e.get("model") or e.get("key_id") or "-"
                sha = (e.get("sha256") or "")[:12]
                print(f"{e['time']}  {e['actor']:<12} {e['action']:<10} {what:<24} {sha:<12} {e['result']}")
        return {"entries": entries}

    return _run(args, go)


__all__ = ["add_access_commands"]
