"""The NoSuch hint (ave.broker.suggest): pure, bounded, and naming the first mistake."""
import pytest

from ave.broker.suggest import CLIP, SHOWN, first_hint, hint

IDENTITIES = {'relay': 'uid', 'serial': 'uid', 'handset': 'serial', 'workspace': 'uid'}
KNOWN = [
    {'type': 'relay', 'uid': 'r1', 'circuits': ['c1'], 'pretty': 'bench 1'},
    {'type': 'relay', 'uid': 'r2', 'circuits': ['c1', 'c2'], 'pretty': 'bench 2'},
    {'type': 'handset', 'serial': 'CB5A', 'sdk': 33, 'power_state': 'boot_completed'},
]


@pytest.mark.parametrize('request_, expected', [
    ({'type': 'relay', 'uidd': 'r1'}, "no relay has key 'uidd' (did you mean 'uid'?)"),
    ({'type': 'relay', 'zz': 'x'}, "no relay has key 'zz' (keys: circuits, pretty, uid)"),
    ({'type': 'relay', 'uid': 'r9'}, "no relay has uid 'r9' (known: r1, r2)"),
    ({'type': 'relay', 'pretty': 'bench 3'}, "no relay has pretty 'bench 3' "
                                             "(known: bench 1, bench 2)"),
    ({'type': 'relay', 'pretty': 'bench  1'}, "no relay has pretty 'bench  1' "
                                              "(did you mean 'bench 1'?)"),
    ({'type': 'relya'}, "no equipment of type 'relya' (did you mean 'relay'?)"),
    ({'type': 'toaster'}, "no equipment of type 'toaster' "
                          "(types: handset, relay, serial, workspace)"),
    ({'type': 'serial'}, 'the broker lists no serial'),
    ({'type': 'relay', 'uid': 'r1', 'pretty': 'bench 2'},
     "no single relay has uid 'r1' and pretty 'bench 2' (nearest: relay 'r1' has "
     "pretty 'bench 1')"),
])
def test_hint_names_the_first_mistake(request_, expected):
    assert hint(request_, KNOWN, IDENTITIES) == expected


def test_a_string_where_the_lab_has_a_number_says_to_use_json():
    text = hint({'type': 'handset', 'sdk': '33'}, KNOWN, IDENTITIES)
    assert text == ("no handset has sdk '33' (known: 33; values compare exactly, so give "
                    "a non-string value as JSON)")


def test_a_circuit_name_where_the_lab_has_a_list_says_to_use_json():
    text = hint({'type': 'relay', 'circuits': 'c1'}, KNOWN, IDENTITIES)
    assert text.startswith("no relay has circuits 'c1' (known: [\"c1\"], [\"c1\", \"c2\"]; "
                           'values compare exactly'), text


def test_a_matching_request_gets_no_hint():
    assert hint({'type': 'relay', 'uid': 'r1'}, KNOWN, IDENTITIES) == ''


def test_known_profiles_may_be_a_generator():
    assert hint({'type': 'relya'}, iter(KNOWN), IDENTITIES).endswith("(did you mean 'relay'?)")


def test_first_hint_looks_through_profiles_and_stack_groups():
    request = [{'type': 'relay', 'uid': 'r1'}, [{'type': 'handset'}, {'type': 'relay', 'uid': 'r7'}]]
    assert first_hint(request, KNOWN, IDENTITIES) == "no relay has uid 'r7' (known: r1, r2)"
    assert first_hint([{'type': 'relay'}], KNOWN, IDENTITIES) == ''


def test_hint_stays_one_short_line_whatever_the_request_and_the_lab():
    lab = [{'type': 'relay', 'uid': f'r{i}' + 'x' * 200} for i in range(1000)]
    text = hint({'type': 'relay', 'uid': 'y' * 100000, 'z' * 100000: 1}, lab, IDENTITIES)
    assert len(text) < 500 and '\n' not in text, text
    text = hint({'type': 'relay', 'uid': 'y' * 100000}, lab, IDENTITIES)
    assert len(text) <= 60 + SHOWN * (CLIP + 2) + 40 and '(1000 in all)' in text, text


def test_hostile_values_do_not_break_the_hint():
    text = hint({'type': 'relay', 'uid': {'$gt': ''}}, KNOWN, IDENTITIES)
    assert text == 'no relay has uid {"$gt": ""} (known: r1, r2)'
