"""The controller's HTTP API (aiohttp): thin views over the same service functions the CLI uses.

Each route module under `fedsky.controller.api` exposes `routes: web.RouteTableDef`; the views
take what they need from `request.app[SERVICES]` and answer through `api.responses`. Every
request passes `access.authorize` first (who calls, may they, the audit record).
"""

from __future__ import annotations

from aiohttp import web
from fedsky.controller.api import admin, agents, clouds, dashboard, events, jobs, models, placement
from fedsky.controller.api.access import authorize
from fedsky.controller.api.responses import SERVICES, answer_errors
from fedsky.controller.security import audit, users
from fedsky.controller.services import Services

# The route modules, in registration order.
ROUTE_TABLES: tuple[web.RouteTableDef, ...] = (
    agents.routes,
    jobs.routes,
    models.routes,
    clouds.routes,
    admin.routes,
    placement.routes,
    events.routes,
    dashboard.routes,
)

MAX_BODY_BYTES = 64 << 20  # uploads (model files, credential files) stay well under this


def make_app(services: Services) -> web.Application:
    # The tables the access check reads and the audit log writes.
    users.ensure_schema(services.store)
    audit.ensure_schema(services.store)
    # `authorize` outermost: it sees the final (JSON) answer of every view for the audit log.
    app = web.Application(middlewares=[authorize, answer_errors], client_max_size=MAX_BODY_BYTES)
    app[SERVICES] = services
    app[events.EVENT_STREAMS] = events.StreamCount()
    for routes in ROUTE_TABLES:
        app.add_routes(routes)
    return app
