"""Exceptions a broker sends its clients; they arrive typed through exception_factory."""
from ave.exceptions import AveException, Restarting

__all__ = ['Busy', 'LabUnavailable', 'NoSuch', 'NotOwner', 'NotAllocated', 'Restarting']


class Busy(AveException):
    """Equipment matching the request exists, but someone else holds it (or its stack)."""


class NoSuch(AveException):
    """No equipment matches the request at all."""


class NotOwner(AveException):
    """The equipment is allocated, but to another client."""


class NotAllocated(AveException):
    """The equipment is not allocated to anyone."""


class LabUnavailable(AveException):
    """The broker cannot reach its lab's etcd lately: it grants nothing until it can."""
