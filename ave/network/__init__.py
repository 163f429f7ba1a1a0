"""Networking for AVE services: framing, connections, processes and RPC controls."""
