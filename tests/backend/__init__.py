"""Tests of the backend (`backend/`)."""
