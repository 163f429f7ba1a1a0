"""The broker's status page and Prometheus metrics, served by a process of their own.

``feed`` is what the broker uses (cheap, standard library only); ``server`` is the
``ave-broker-http`` process, imported only by a broker configured with ``"http"``.
"""
