"""Sensor backends: each module has an ``open(options, gpio)`` factory used by hw.registry."""
