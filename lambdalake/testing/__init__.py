"""Helpers for tests and benchmarks: real services started without Docker.

``from lambdalake.testing.kafka import KafkaBroker``
"""
