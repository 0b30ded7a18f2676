"""The two routers every route module adds its routes to, one object each.

One router per audience, not one per module: FastAPI includes a nested router lazily, so its
routes would not be listed in ``public_router.routes`` (tests/test_abuse.py walks them), and
the routes keep the order the modules are imported in (server/api/__init__.py).
"""

from fastapi import APIRouter

public_router = APIRouter()
admin_router = APIRouter(prefix="/admin", tags=["admin"])
