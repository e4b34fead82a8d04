"""What every room shares: the wire codec, framed links, configuration and logging.

The lowest room: it imports no other part of meshd.
"""
