"""The dashboard's pages. Each module has ``layout(...)`` (called by the router with the URL's
parameters) and ``register(app, data, settings)`` (its callbacks, bound to one app)."""
