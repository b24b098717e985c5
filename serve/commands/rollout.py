"""`slimserve rollout status|pause|resume|abort|promote`: the operator's side of a progressive
rollout, through the ingress's admin routes (rollout_routes.py). The admin key is read from the
environment (never a command-line argument, which other users of the machine can see)."""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Any

ACTIONS = ("status", "pause", "resume", "abort", "promote")


def add_parser(sub) -> None:
    p = sub.add_parser("rollout", help="a model's progressive rollout: status, pause, resume, abort, promote")
    p.add_argument("action", choices=ACTIONS)
    p.add_argument("--url", default="http://127.0.0.1:8000", help="the slimserve endpoint (default http://127.0.0.1:8000)")
    p.add_argument("--model", required=True, help="public model name")
    p.add_argument("--reason", help="recorded in the rollout's history (actions other than status)")
    p.add_argument("--admin-key-env", default="SLIMSERVE_ADMIN_KEYS",
                   help="environment variable holding the admin key (the first, if several; default SLIMSERVE_ADMIN_KEYS)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=run)


def fetch(url: str, model: str, key: str | None, action: str = "status", reason: str | None = None) -> tuple[int, Any]:
    import httpx

    headers = {"authorization": f"Bearer {key}"} if key else {}
    base = f"{url.rstrip('/')}/slimserve/rollout/{model}"
    if action == "status":
        r = httpx.get(base, headers=headers, timeout=30)
    else:
        r = httpx.post(f"{base}/{action}", headers=headers, json={"reason": reason} if reason else {}, timeout=30)
    try:
        return r.status_code, r.json()
    except ValueError:
        return r.status_code, {"error": {"message": r.text}}


def admin_key(env: str) -> str | None:
    keys = [k.strip() for k in os.environ.get(env, "").split(",") if k.strip()]
    return keys[0] if keys else None


def run(args) -> int:
    import httpx

    try:
        code, body = fetch(args.url, args.model, admin_key(args.admin_key_env), args.action, args.reason)
    except httpx.HTTPError as e:
        print(f"slimserve rollout: cannot reach {args.url}: {e}", file=sys.stderr)
        return 1
    if code != 200:
        print(f"slimserve rollout {args.action}: {code}: {(body.get('error') or {}).get('message', body)}", file=sys.stderr)
        return 1
    print(json.dumps(body, indent=2) if args.json else format_status(body))
    return 0


def format_status(s: dict) -> str:
    ev = s["evidence"]
    lines = [
        f"rollout of {s['candidate']} against {s['baseline']}: {s['status']}, step {s['step']}/{len(s['steps'])} "
        f"(steps {', '.join(f'{x:g}' for x in s['steps'])} %), candidate at {s['candidate_percent']:g} %",
        f"this step: {s['step_evidence']['candidate_requests']} candidate requests; since the evidence started: "
        f"{ev['candidate_requests']} candidate requests ({ev['candidate_errors']} failed), "
        f"{ev['baseline_requests']} baseline requests, live agreement {ev['matches']}/{ev['probes']}",
        "history:",
    ]
    lines += [f"  {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(h['at']))}  {h['action']:<8} -> {h['percent']:g} %  "
              f"{h['reason']}" for h in s["history"]]
    return "\n".join(lines)
