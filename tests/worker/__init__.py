"""Tests of the worker (`worker/`) with real processes."""
