"""The operator's surface: command line, daemon startup, admin socket, benchmarks, bots.

The top room: it composes the others and nothing imports it.
"""
