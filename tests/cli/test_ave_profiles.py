"""PROFILE arguments (ave.cli.profiles): both forms, and one clear line per mistake."""
import pytest

from ave.cli.profiles import ProfileSyntaxError, parse_profile, parse_request


@pytest.mark.parametrize('text, profile', [
    ('relay', {'type': 'relay'}),
    ('relay,uid=r1', {'type': 'relay', 'uid': 'r1'}),
    ('handset,platform=android,power_state=boot_completed',
     {'type': 'handset', 'platform': 'android', 'power_state': 'boot_completed'}),
    ('relay,uid=1', {'type': 'relay', 'uid': '1'}),
    ('relay,pretty=a=b', {'type': 'relay', 'pretty': 'a=b'}),
    ('relay,pretty=', {'type': 'relay', 'pretty': ''}),
    ('relay,pretty=bench 3', {'type': 'relay', 'pretty': 'bench 3'}),
    ('{"type": "relay", "uid": "r1"}', {'type': 'relay', 'uid': 'r1'}),
    ('{"type": "relay", "pretty": "a,b", "n": 4}', {'type': 'relay', 'pretty': 'a,b', 'n': 4}),
])
def test_profile_forms_are_read(text, profile):
    assert parse_profile(text) == profile


def test_values_stay_strings():
    assert parse_profile('serial,uid=007')['uid'] == '007'


def test_json_list_is_a_stack_group():
    assert parse_request('[{"type": "handset"}, {"type": "relay"}]') == \
        [{'type': 'handset'}, {'type': 'relay'}]


@pytest.mark.parametrize('text, problem', [
    ('', "PROFILE '': empty; write TYPE[,KEY=VALUE...]"),
    ('uid=r1', "PROFILE 'uid=r1': starts with 'uid=', but the equipment type comes first, "
               "as in relay,uid=r1"),
    ('relay,uid', "PROFILE 'relay,uid': 'uid' is not KEY=VALUE"),
    ('relay,pretty=a,b', "PROFILE 'relay,pretty=a,b': 'b' is not KEY=VALUE; a value cannot "
                         "hold a comma here: write such a profile as JSON, as in "
                         "'{\"type\": \"relay\", \"pretty\": \"a,b\"}'"),
    ('relay,,uid=r1', 'has an empty field (two commas in a row, or one at the end)'),
    ('relay,uid=r1,', 'has an empty field (two commas in a row, or one at the end)'),
    ('relay,=r1', "PROFILE 'relay,=r1': a key is missing"),
    (',uid=r1', "PROFILE ',uid=r1': the type is missing"),
    ('relay,uid=a,uid=b', "key 'uid' is given twice"),
    ('relay,type=serial', "key 'type' is given twice (the type is the first field)"),
    ('relay, uid=r1', "a key ' uid' has spaces around it"),
    ('{"uid": "r1"}', 'a JSON profile needs "type", a non-empty string'),
    ('{"type": ""}', 'a JSON profile needs "type", a non-empty string'),
    ('{"type": "relay", "type": "serial"}', "key 'type' appears twice in one JSON object"),
    ('{"type": "relay"', "not valid JSON: Expecting ',' delimiter at column 17"),
    ('[]', 'a stack group is a non-empty JSON list of profiles'),
    ('[1]', 'a JSON profile is an object, not a number'),
])
def test_each_mistake_is_one_line_naming_the_argument(text, problem):
    with pytest.raises(ProfileSyntaxError) as caught:
        parse_request(text)
    message = str(caught.value)
    assert problem in message, message
    assert message.startswith(f'PROFILE {text!r}: ') and '\n' not in message, message


def test_a_single_profile_refuses_a_stack_group():
    with pytest.raises(ProfileSyntaxError, match='a stack group .* is not accepted here'):
        parse_profile('[{"type": "relay"}]')
