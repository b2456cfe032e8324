"""Running a Flask app under gunicorn with its jobs process beside it (agent and hub alike)."""

from __future__ import annotations

import os
import subprocess
import sys
import typing as t

from flask import Flask


def serve(app: Flask, *, host: str, port: int, workers: int,
          jobs_module: str | None, instance: str) -> None:
    """Serve ``app`` with gunicorn sync workers; unless ``jobs_module`` is None, run
    ``python -m <jobs_module> jobs --instance <instance>`` as a child for as long as it serves.
    """
    from gunicorn.app.base import BaseApplication  # type: ignore[import-untyped]

    class _Server(BaseApplication):  # type: ignore[misc]
        def load_config(self) -> None:
            self.cfg.set("bind", f"{host}:{port}")
            self.cfg.set("workers", workers)
            self.cfg.set("worker_class", "sync")
            self.cfg.set("accesslog", "-")
            # Query strings can carry secrets (reset links): log the path only.
            self.cfg.set("access_log_format", '%(h)s "%(m)s %(U)s" %(s)s %(b)s %(L)ss')
            self.cfg.set("timeout", 30)
            self.cfg.set("graceful_timeout", 5)
            # One shared control socket per user would let services on one host collide.
            self.cfg.set("control_socket_disable", True)
            # The app alone decides from X-Forwarded-Proto/-For, and only behind the proxies
            # its TRUSTED_PROXIES setting names: gunicorn would trust any local peer's headers.
            self.cfg.set("forwarded_allow_ips", "")
            self.cfg.set("secure_scheme_headers", {})

        def load(self) -> t.Any:
            return app

    jobs = None if jobs_module is None else _start_jobs(jobs_module, instance)
    arbiter = os.getpid()
    try:
        _Server().run()
    finally:
        # gunicorn forks its workers inside run(): only the arbiter owns the jobs process.
        if os.getpid() == arbiter:
            _stop_jobs(jobs)


def _start_jobs(module: str, instance: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen(  # noqa: S603 - our own interpreter and module
        [sys.executable, "-m", module, "jobs", "--instance", instance,
         "--parent-pid", str(os.getpid())],
        stdin=subprocess.DEVNULL,
    )


def _stop_jobs(process: subprocess.Popen[bytes] | None) -> None:
    if process is None or process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(30)  # the jobs finish the run in flight
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(5)
