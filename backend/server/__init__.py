"""aiohttp-specific server code: the listening site, the connection protocol (drain, header-read
timeout, problem+json for malformed requests), the drain sequence, and the check of the aiohttp
internals they lean on (each behind a setting that falls back to aiohttp's own behaviour)."""
