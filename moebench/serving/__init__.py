"""Serving: what a request carries (requests), the model behind a server (engine), dynamic batching
(batcher), the ASGI application and its uvicorn workers (http_app), Ray Serve (ray_serve,
ray_cluster), servers started from their command line (server_process), and the bare servers that
measure the HTTP path's ceiling (bare_http)."""
