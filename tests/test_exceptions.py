"""The AVE exception family and its round trip through the wire form."""
import json

import pytest

from ave import exceptions
from ave.exceptions import (
    AveException, Exit, RunError, Timeout, details_of, exception_factory)

REFERENCE_CLASSES = [
    'Timeout', 'Exit', 'AuthError', 'RunError', 'Restarting', 'Terminated', 'Offline',
    'CompositionServerResponseNot200Exception', 'CompositionServerResponseHttpRetryCode',
    'CompositionServerResponseOrderFailed', 'CompositionDownloadImagesFailed']


@pytest.mark.parametrize('name', REFERENCE_CLASSES)
def test_every_reference_class_is_an_ave_exception(name):
    assert issubclass(getattr(exceptions, name), AveException)


def test_type_is_set_from_class_name():
    assert Timeout('slow').details == {'type': 'Timeout', 'message': 'slow'}


def test_str_is_the_message():
    assert str(Exit({'message': 'bye'})) == 'bye'


def test_details_keys_read_as_attributes():
    error = Timeout({'message': 'm', 'cmd': ['sleep', '9'], 'out': 'so far'})
    assert (error.cmd, error.out) == (['sleep', '9'], 'so far')


def test_missing_attribute_raises_attribute_error():
    with pytest.raises(AttributeError):
        Timeout('m').nothing_here


def test_run_error_keeps_cmd_out_and_message():
    error = RunError(['nope'], 'output', 'not found')
    assert (error.cmd, error.out, error.message, str(error)) == (
        ['nope'], 'output', 'not found', 'not found')


def test_factory_rebuilds_known_types_from_json():
    details = json.loads(json.dumps(details_of(RunError('x', 'y', 'z'))))
    error = exception_factory(details)
    assert type(error) is RunError and error.out == 'y'


def test_factory_keeps_unknown_type_name_on_base_class():
    error = exception_factory({'type': 'KeyError', 'message': 'k'})
    assert type(error) is AveException and error.details['type'] == 'KeyError'


def test_factory_returns_rather_than_raises():
    assert isinstance(exception_factory({'type': 'Exit', 'message': ''}), Exit)


def test_subclass_defined_elsewhere_is_found_by_name():
    class LabSpecificFailure(AveException):
        pass
    assert type(exception_factory({"type": "LabSpecificFailure", "message": "x"})) is LabSpecificFailure


def test_format_trace_renders_remote_rows():
    error = exception_factory({'type': 'Timeout', 'message': 'm',
                               'trace': [['svc.py', 12, 'serve', 'do_it()']]})
    assert error.format_trace() == '  File "svc.py", line 12, in serve\n    do_it()\n'


def test_format_trace_is_empty_without_trace():
    assert Timeout('m').format_trace() == ''


def test_details_of_builtin_exception_carries_its_trace():
    try:
        raise ValueError('bad')
    except ValueError as error:
        details = details_of(error)
    assert details['type'] == 'ValueError' and details['trace'][-1][2].startswith('test_')
