"""Moved to sift.serving.http; this import path (and sift.http.app, sift.http.generations) keeps
working for one more release."""

from sift.serving.http import create_app

__all__ = ["create_app"]
