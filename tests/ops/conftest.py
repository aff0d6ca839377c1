"""Ops tests reuse the end-to-end agent fixtures (real `edgecv-agent run` processes)."""

from tests.e2e.conftest import fashion_bundle, start_agent  # noqa: F401
