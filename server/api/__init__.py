"""The HTTP API: thin routes over the prediction service (server/prediction.py).

Importing the package registers every route on the two routers the app includes.
"""

# isort: off
# Imported for their routes, in this order: a router lists its routes as they are registered.
from server.api import predict, health, admin  # noqa: F401

# isort: on
from server.api.routers import admin_router, public_router

__all__ = ["admin_router", "public_router"]
