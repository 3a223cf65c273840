"""The HTTP edge: handlers, middlewares, the OpenAPI document and the static pages (assets/)."""
