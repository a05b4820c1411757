"""The query service: `QueryService` (service.py, Ray-free logic) behind a Ray Serve FastAPI ingress (app.py)."""
