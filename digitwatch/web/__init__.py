"""`digitwatch serve`: a page, an HTTP API and the review screen over the library.

The page and the API are a second face on the same code as `predict` and `review`: the
pipeline, the review queue's functions and the status reader are called, never copied.
"""

from digitwatch.web.app import create_app, serve

__all__ = ["create_app", "serve"]
