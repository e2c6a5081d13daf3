"""`sift serve`: an OpenAI-compatible HTTP server over a workspace's routed serving.

app.py holds the FastAPI app (`create_app`); generations.py decides which loaded state of the
workspace (generation) answers each request, so that a forget under a running server never
lets a request accepted after its certificate reach a dropped or replaced adapter.
"""

from sift.serving.http.app import create_app

__all__ = ["create_app"]
