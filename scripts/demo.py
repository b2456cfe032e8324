"""Start a demo site on SQLite: ``./dev run`` (creates it under .demo/ on first start).

Options: ``--port N`` (default 8000), ``--reset`` (start from an empty instance).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
INSTANCE = ROOT / ".demo" / "site"
DEMO_USER = "demo"
DEMO_EMAIL = "demo@example.com"
DEMO_PASSWORD = "purple otter tea garden"


def agent(*args: str, stdin: str | None = None) -> None:
    exe = Path(sys.executable).with_name("headlesskey-agent")
    subprocess.run([str(exe), *args], input=stdin, text=True, check=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--reset", action="store_true", help="delete the demo instance first")
    args = parser.parse_args()
    if args.reset and INSTANCE.exists():
        shutil.rmtree(INSTANCE)
    site_url = f"http://127.0.0.1:{args.port}"
    if not (INSTANCE / "site.toml").exists():
        agent("init", "--instance", str(INSTANCE), "--algorithm", "ES256",
              "--site-url", site_url, "--site-name", "HeadlessKey demo")
    marker = INSTANCE / ".demo-user"
    if not marker.exists():
        agent("users", "create", "--instance", str(INSTANCE), "--username", DEMO_USER,
              "--email", DEMO_EMAIL, "--display-name", "Demo User", "--password-stdin",
              stdin=DEMO_PASSWORD + "\n")
        marker.touch()
    api = f"{site_url}/wp-json/headlesskey/v1"
    print(
        f"""
HeadlessKey demo site
  API          {api}
  OpenAPI      {api}/openapi.json
  JWKS         {site_url}/.well-known/jwks.json
  demo login   {DEMO_USER} / {DEMO_PASSWORD}
  mail         printed on this console (development mail backend)

Try it:
  curl -s -X POST {api}/token -H 'Content-Type: application/json' \\
       -d '{{"username": "{DEMO_USER}", "password": "{DEMO_PASSWORD}"}}'
More in docs/api.md. Stop with Ctrl-C.
""",
        flush=True,
    )
    exe = Path(sys.executable).with_name("headlesskey-agent")
    os.execv(str(exe), [str(exe), "serve", "--instance", str(INSTANCE), "--port", str(args.port)])


if __name__ == "__main__":
    main()
