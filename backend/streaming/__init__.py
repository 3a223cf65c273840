"""Server-Sent Events once a stream is admitted: the per-process hub, its window of frames, filters,
the dashboard feed and the response that streams. The endpoints are backend/http/streams.py."""
