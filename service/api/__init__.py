"""The HTTP API: the FastAPI app, routes, middleware, auth, errors, schemas and what the routes do (audits,
reports, idempotency, metrics, policy). Imports `service.submission`, `service.screening` and `service.settings`."""
