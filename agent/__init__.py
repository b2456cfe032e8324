"""HeadlessKey agent: a complete JWT auth REST API for one site, as a Flask extension.

    from flask import Flask
    from agent import HeadlessKey, current_identity

    app = Flask(__name__)
    app.config["HEADLESSKEY_SECRET_KEY"] = "..."   # at least 32 bytes
    hk = HeadlessKey(app)

    @app.get("/api/orders")
    @hk.require(roles=["customer"])
    def orders():
        return {"user": current_identity.user_id}
"""

from .errors import AgentError
from .errors import ConfigError
from .extension import HeadlessKey
from .extension import Identity
from .extension import current_identity

__all__ = ["AgentError", "ConfigError", "HeadlessKey", "Identity", "current_identity"]
