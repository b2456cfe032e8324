"""A site's own route protected by the agent: ``GET /protected`` with ``@hk.require()``.

Every request verifies the token's signature and claims and reads its session (revocation,
user status and roles, current access token). The agent's API is mounted too
(``/wp-json/headlesskey/v1``: logins, the activity log). Settings come from
``HEADLESSKEY_*`` in the environment; the instance folder from ``HEADLESSKEY_INSTANCE``.
"""

from __future__ import annotations

import os

from flask import Flask
from flask import jsonify

from agent import HeadlessKey
from agent import current_identity

app = Flask(__name__, instance_path=os.path.abspath(os.environ["HEADLESSKEY_INSTANCE"]))
hk = HeadlessKey(app)


@app.get("/protected")
@hk.require()
def protected() -> object:
    assert current_identity is not None
    return jsonify(identity=current_identity.user_login)
