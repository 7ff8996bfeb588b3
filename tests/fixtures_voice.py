"""Fixtures for the voice work (trained models, compiled programs); loaded from conftest.py via pytest_plugins."""

from __future__ import annotations
