"""Sensor backends, one module per type, each listed once in hw.registry.SENSORS.

Each module declares ``OPTIONS`` (its ``[[sensors]]`` keys as ``hw.base.Option``: type, bounds,
default) and ``open_sensor(options, gpio)``, which receives the options with defaults filled in.
A module that needs a GPIO backend sets ``USES_GPIO = True``. Module imports stay cheap: the
config loader imports the module of every configured type to validate its keys.
"""
