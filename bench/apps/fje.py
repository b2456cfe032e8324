"""The peer: flask-jwt-extended, configured the usual way (PEM strings for RS256/ES256).

  GET  /protected   @jwt_required(), with a blocklist loader (a dict lookup on the jti)
  POST /token       {"username", "password"}: argon2id verification, then an access token
"""

from __future__ import annotations

import uuid
from datetime import timedelta

from flask import Flask
from flask import jsonify
from flask import request
from flask_jwt_extended import JWTManager
from flask_jwt_extended import create_access_token
from flask_jwt_extended import get_jwt_identity
from flask_jwt_extended import jwt_required

from .common import ALGORITHM
from .common import AUDIENCE
from .common import CUSTOM_CLAIMS
from .common import ISSUER
from .common import TTL_SECONDS
from .common import check_password
from .common import key_pems

app = Flask(__name__)
app.config.update(
    JWT_ALGORITHM=ALGORITHM,
    JWT_TOKEN_LOCATION=["headers"],
    JWT_ACCESS_TOKEN_EXPIRES=timedelta(seconds=TTL_SECONDS),
    JWT_ENCODE_ISSUER=ISSUER,
    JWT_DECODE_ISSUER=ISSUER,
    JWT_ENCODE_AUDIENCE=AUDIENCE,
    JWT_DECODE_AUDIENCE=AUDIENCE,
    JWT_ENCODE_NBF=True,
)
signing, verifying = key_pems(ALGORITHM)
if ALGORITHM == "HS256":
    app.config["JWT_SECRET_KEY"] = signing
else:
    app.config["JWT_PRIVATE_KEY"] = signing.decode()
    app.config["JWT_PUBLIC_KEY"] = verifying.decode()

jwt = JWTManager(app)
# A per-process blocklist, as the flask-jwt-extended docs show it (10^4 revoked jtis).
REVOKED = {uuid.uuid4().hex: True for _ in range(10_000)}


@jwt.token_in_blocklist_loader
def token_revoked(jwt_header: dict[str, object], jwt_payload: dict[str, object]) -> bool:
    return jwt_payload["jti"] in REVOKED


@app.get("/protected")
@jwt_required()
def protected() -> object:
    return jsonify(identity=get_jwt_identity())


@app.post("/token")
def login() -> object:
    body = request.get_json(silent=True) or {}
    username = str(body.get("username", ""))
    if not check_password(username, str(body.get("password", ""))):
        return jsonify(error="invalid credentials"), 401
    token = create_access_token(identity=username, additional_claims=CUSTOM_CLAIMS)
    return jsonify(access_token=token, token_type="Bearer", expires_in=TTL_SECONDS)  # noqa: S106


def mint_token(subject: str = "user-42") -> str:
    with app.app_context():
        return create_access_token(identity=subject, additional_claims=CUSTOM_CLAIMS)
