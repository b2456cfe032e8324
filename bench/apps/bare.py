"""Bare Flask: ``GET /hello``, the ceiling of any protected route; ``POST /argon2``, the login
bound: one argon2id verification at the configured parameters and nothing else."""

from __future__ import annotations

from flask import Flask
from flask import jsonify
from flask import request

from .common import DEMO_USER
from .common import check_password

app = Flask(__name__)


@app.get("/hello")
def hello() -> object:
    return jsonify(message="hello", ok=True)


@app.post("/argon2")
def argon2() -> object:
    body = request.get_json(silent=True) or {}
    if not check_password(DEMO_USER, str(body.get("password", ""))):
        return jsonify(error="invalid credentials"), 401
    return jsonify(ok=True)
