"""Server-Sent Events for dashboards: the per-process hub, filters, and the aiohttp-sse endpoints."""
