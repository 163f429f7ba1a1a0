"""The lab: many hosts' brokers as one pool, sharing state in etcd.

``ave.lab.etcd`` is the only module the rest of the lab imports to reach etcd; the
modules beside it (``httpwire``, ``etcd_transport``, ``etcd_watch``, ``etcd_messages``,
``etcd_errors``) are its parts.
"""
