"""The broker: allocation of lab equipment by profile.

Test jobs import the client from here: ``from ave.broker import Broker``.
"""
from ave.broker.client import Broker

__all__ = ['Broker']
