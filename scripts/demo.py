"""A whole local federation on SQLite: ``./dev run``.

On first start it creates, under ``.demo/``: a hub with an admin, two member sites (A: ES256,
B: RS256) onboarded at the hub and joined to it. Then it runs the hub, both agents (each with
its jobs process) and two small frontends on their own origins, which call their site's API
cross-origin. Register at A, log in, "Continue to site B", and arrive at B logged in.

Options: ``--reset`` (start from scratch), ``--dir PATH`` (instead of .demo), ``--base-port N``
(hub N, APIs N+1 and N+2, frontends N+11 and N+12). Default ports: hub 9000, Site A's API 8000
(with the user ``demo``, as in docs/api.md), Site B's API 8001, frontends 3000 and 3001.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from http.server import SimpleHTTPRequestHandler
from http.server import ThreadingHTTPServer
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FRONTEND = Path(__file__).resolve().parent / "demo_frontend"
BIN = Path(sys.executable).parent
DEMO_USER = "demo"
DEMO_PASSWORD = "purple otter tea garden"  # noqa: S105 - the demo's published test password
# Site A's API on :8000 is the site of docs/api.md's walkthrough.
DEFAULT_PORTS = {"hub": 9000, "a": 8000, "b": 8001, "web_a": 3000, "web_b": 3001}


def run(*args: str, stdin: str | None = None, env: dict[str, str] | None = None) -> str:
    result = subprocess.run(  # noqa: S603 - our own commands, next to this interpreter
        [str(BIN / args[0]), *args[1:]], input=stdin, text=True, capture_output=True, env=env,
        check=False)
    if result.returncode != 0:
        sys.exit(f"{' '.join(args[:3])} failed:\n{result.stdout}{result.stderr}")
    return result.stdout


def wait_for(url: str, seconds: float = 30) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=2):  # noqa: S310 - loopback only
                return
        except OSError:
            time.sleep(0.2)
    sys.exit(f"{url} did not answer within {seconds:.0f} s")


class Demo:
    def __init__(self, base: Path, ports: dict[str, int]) -> None:
        self.base = base
        self.hub_port = ports["hub"]
        self.sites = {
            "site-a": {"name": "Site A", "alg": "ES256", "api_port": ports["a"],
                       "web_port": ports["web_a"]},
            "site-b": {"name": "Site B", "alg": "RS256", "api_port": ports["b"],
                       "web_port": ports["web_b"]},
        }
        self.hub_url = f"http://127.0.0.1:{self.hub_port}"
        self.processes: list[subprocess.Popen[bytes]] = []

    def api(self, key: str) -> str:
        return f"http://127.0.0.1:{self.sites[key]['api_port']}"

    def web(self, key: str) -> str:
        return f"http://127.0.0.1:{self.sites[key]['web_port']}"

    def create(self) -> None:
        """Hub, admin, two onboarded sites that joined it (first start only)."""
        hub = self.base / "hub"
        run("headlesskey-hub", "init", "--instance", str(hub), "--url", self.hub_url)
        password = "demo-" + secrets.token_urlsafe(12)
        run("headlesskey-hub", "admins", "create", "--instance", str(hub), "--username", "admin",
            "--password-stdin", stdin=password + "\n")
        fd = os.open(self.base / "admin-password.txt", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(password + "\n")
        joined = {}
        for key, site in self.sites.items():
            out = run("headlesskey-hub", "sites", "add", "--instance", str(hub), "--name",
                      str(site["name"]), "--url", self.api(key), "--key", key,
                      "--origin", self.web(key), "--json")
            joined[key] = json.loads(out)["secret"]
            run("headlesskey-agent", "init", "--instance", str(self.base / key), "--algorithm",
                str(site["alg"]), "--site-url", self.api(key), "--site-name", str(site["name"]))
        self.start_hub()
        for key, secret in joined.items():
            run("headlesskey-agent", "join", "--instance", str(self.base / key), "--hub",
                self.hub_url, "--site-key", key, "--secret-stdin", stdin=secret + "\n")
        # The account docs/api.md's walkthrough logs in with.
        run("headlesskey-agent", "users", "create", "--instance", str(self.base / "site-a"),
            "--username", DEMO_USER, "--email", "demo@example.com", "--display-name", "Demo User",
            "--password-stdin", stdin=DEMO_PASSWORD + "\n")

    def start(self, *args: str) -> None:
        self.processes.append(subprocess.Popen([str(BIN / args[0]), *args[1:]],  # noqa: S603
                                               stdin=subprocess.DEVNULL))

    def start_hub(self) -> None:
        if not any("headlesskey-hub" in str(p.args) for p in self.processes):
            self.start("headlesskey-hub", "serve", "--instance", str(self.base / "hub"),
                       "--port", str(self.hub_port), "--workers", "1")
            wait_for(self.hub_url + "/.well-known/jwks.json")

    def start_all(self) -> None:
        self.start_hub()
        for key, site in self.sites.items():
            self.start("headlesskey-agent", "serve", "--instance", str(self.base / key),
                       "--port", str(site["api_port"]), "--workers", "2")
        for key in self.sites:
            wait_for(self.api(key) + "/wp-json/headlesskey/v1/openapi.json")
        for key in self.sites:
            self.serve_frontend(key)

    def serve_frontend(self, key: str) -> None:
        site = self.sites[key]
        peer = next(k for k in self.sites if k != key)
        config = {"key": key, "name": site["name"],
                  "api": self.api(key) + "/wp-json/headlesskey/v1",
                  "peer": {"key": peer, "name": self.sites[peer]["name"],
                           "frontend": self.web(peer)}}
        script = f"window.HK = {json.dumps(config)};\n".encode()

        class Handler(SimpleHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802
                if self.path.split("?")[0] == "/config.js":
                    self.send_response(200)
                    self.send_header("Content-Type", "text/javascript; charset=utf-8")
                    self.send_header("Content-Length", str(len(script)))
                    self.send_header("Cache-Control", "no-store")
                    self.end_headers()
                    self.wfile.write(script)
                    return
                super().do_GET()

            def log_message(self, format: str, *args: object) -> None:  # noqa: A002
                pass

        handler = functools.partial(Handler, directory=str(FRONTEND))
        server = ThreadingHTTPServer(("127.0.0.1", int(site["web_port"])), handler)
        threading.Thread(target=server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        for process in self.processes:
            if process.poll() is None:
                process.terminate()
        for process in self.processes:
            try:
                process.wait(15)
            except subprocess.TimeoutExpired:
                process.kill()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--reset", action="store_true", help="delete the demo state first")
    parser.add_argument("--dir", type=Path, default=ROOT / ".demo")
    parser.add_argument("--base-port", type=int, default=None,
                        help="hub N, APIs N+1 and N+2, frontends N+11 and N+12")
    args = parser.parse_args()
    base = args.dir.resolve()
    if args.reset and base.exists():
        shutil.rmtree(base)
    n = args.base_port
    ports = DEFAULT_PORTS if n is None else {
        "hub": n, "a": n + 1, "b": n + 2, "web_a": n + 11, "web_b": n + 12}
    demo = Demo(base, ports)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        if not (base / "admin-password.txt").exists():
            if base.exists():
                shutil.rmtree(base)  # a first start that did not finish
            base.mkdir(parents=True)
            os.chmod(base, 0o700)
            demo.create()
        demo.start_all()
        password = (base / "admin-password.txt").read_text().strip()
        print(f"""
HeadlessKey demo federation is running (state in {base}).

  Site A        {demo.web('site-a')}     (its API: {demo.api('site-a')}/wp-json/headlesskey/v1)
  Site B        {demo.web('site-b')}     (its API: {demo.api('site-b')}/wp-json/headlesskey/v1)
  Hub console   {demo.hub_url}/          admin / {password}

Register at Site A (or log in there as {DEMO_USER} / {DEMO_PASSWORD}), press "Continue to
Site B": you arrive at Site B logged in.
Mail (reset links and codes) is printed on this console. Stop with Ctrl-C.
""", flush=True)
        while all(p.poll() is None for p in demo.processes):
            time.sleep(0.5)
        sys.exit("a demo process stopped; shutting the others down")
    except KeyboardInterrupt:
        pass
    finally:
        demo.stop()


if __name__ == "__main__":
    main()
