"""Tests of the job database (`db/`)."""
