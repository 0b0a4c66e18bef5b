"""Serve the static dashboard (plain HTML, CSS and JS modules) at "/" of the HTTP app."""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI
from starlette.staticfiles import StaticFiles

STATIC_DIR = Path(__file__).resolve().parent / "static"


def mount_dashboard(app: FastAPI) -> None:
    """Mount the dashboard files at "/"; call after the API routes so they take precedence."""
    app.mount("/", StaticFiles(directory=STATIC_DIR, html=True), name="dashboard")
