"""Profile: hashing consistent with equality, the profile rules, match and minimize."""
import copy
import pickle

import pytest

from ave.profile import Profile, ProfileError


class HandsetProfile(Profile):
    identity = 'serial'


HANDSET = {'type': 'handset', 'serial': 'CB5A', 'platform': 'android', 'power': 'on'}


def test_profile_is_a_dict_with_the_given_values():
    p = Profile({'type': 'relay', 'uid': 'r1'})
    assert isinstance(p, dict) and p == {'type': 'relay', 'uid': 'r1'}, p


def test_equal_profiles_have_equal_hashes_whatever_the_key_order():
    a = Profile({'type': 'relay', 'uid': 'r1', 'circuits': ['a', 'b']})
    b = Profile({'circuits': ['a', 'b'], 'uid': 'r1', 'type': 'relay'})
    assert a == b and hash(a) == hash(b), 'equal profiles must hash alike'


def test_nested_lists_and_dicts_are_hashable():
    p = Profile({'type': 'relay', 'circuits': ['a', {'b': [1, 2]}], 'meta': {'x': {'y': []}}})
    assert isinstance(hash(p), int)


def test_numerically_equal_values_hash_alike_as_they_compare_alike():
    a = Profile({'type': 't', 'n': 1, 'l': [1.0]})
    b = Profile({'type': 't', 'n': 1.0, 'l': [True]})
    assert a == b and hash(a) == hash(b), 'hash must follow ==, even across int/float/bool'


def test_equal_profile_of_a_subclass_hashes_like_the_base():
    assert hash(HandsetProfile(HANDSET)) == hash(Profile(HANDSET))


def test_profiles_serve_as_dict_keys_and_set_members():
    index = {Profile({'type': 'relay', 'uid': 'r1'}): 'first'}
    assert index[Profile({'uid': 'r1', 'type': 'relay'})] == 'first'
    assert len({Profile(HANDSET), HandsetProfile(HANDSET)}) == 1


def test_different_profiles_are_told_apart_as_keys():
    index = {Profile({'type': 'relay', 'uid': 'r1'}): 1, Profile({'type': 'relay', 'uid': 'r2'}): 2}
    assert index[Profile({'type': 'relay', 'uid': 'r2'})] == 2


def test_hash_follows_the_current_content():
    p = Profile({'type': 'relay'})
    p['uid'] = 'r1'
    assert hash(p) == hash(Profile({'type': 'relay', 'uid': 'r1'}))


def test_copy_and_pickle_keep_class_and_content():
    p = HandsetProfile(HANDSET)
    for clone in (copy.copy(p), copy.deepcopy(p), pickle.loads(pickle.dumps(p))):
        assert type(clone) is HandsetProfile and clone == p, clone


def test_any_dict_with_string_keys_is_a_profile_even_without_type():
    partial = Profile({'serial': 'CB5A'})
    assert partial == {'serial': 'CB5A'} and Profile(HANDSET).match(partial)


def test_empty_profile_is_a_profile():
    assert Profile({}) == {} and Profile(HANDSET).match(Profile({}))


def test_equipment_profile_without_type_is_refused():
    with pytest.raises(ProfileError, match="has no 'type'"):
        HandsetProfile({'serial': 'CB5A'})


def test_request_without_type_is_refused_by_validate():
    with pytest.raises(ProfileError, match="has no 'type'"):
        Profile.validate(Profile({'serial': 'X1'}))


@pytest.mark.parametrize('kind', [None, 5, '', ['handset']])
def test_type_that_is_not_a_non_empty_string_is_refused(kind):
    with pytest.raises(ProfileError, match="'type' must be a non-empty string"):
        HandsetProfile({'type': kind, 'serial': 'CB5A'})
    with pytest.raises(ProfileError, match="'type' must be a non-empty string"):
        Profile.validate({'type': kind})


def test_non_string_key_is_refused():
    with pytest.raises(ProfileError, match='keys must be strings, got 1'):
        Profile({'type': 'relay', 1: 'x'})


def test_subclass_refuses_a_profile_without_its_identity():
    with pytest.raises(ProfileError, match="HandsetProfile .* has no 'serial'"):
        HandsetProfile({'type': 'handset'})


def test_validate_accepts_a_request_profile():
    assert Profile.validate({'type': 'handset', 'platform': 'android'}) is None


@pytest.mark.parametrize('request_', [[], 'handset', None, {}, {'type': 3}, {1: 'x', 'type': 't'}])
def test_validate_refuses_what_a_client_might_send(request_):
    with pytest.raises(ProfileError):
        Profile.validate(request_)


def test_validate_names_the_wrong_shape():
    with pytest.raises(ProfileError, match='a profile must be a dict, got list'):
        Profile.validate([{'type': 'handset'}])


def test_mandatory_keys_are_type_then_identity():
    assert Profile.mandatory_keys() == ('type',)
    assert HandsetProfile.mandatory_keys() == ('type', 'serial')


def test_match_accepts_a_subset_with_equal_values():
    assert Profile(HANDSET).match({'type': 'handset', 'platform': 'android'})


def test_match_refuses_a_different_value():
    assert not Profile(HANDSET).match({'type': 'handset', 'platform': 'ios'})


def test_match_refuses_a_key_self_lacks_even_when_asked_for_none():
    assert not Profile(HANDSET).match({'type': 'handset', 'owner': None})


def test_match_with_an_empty_request_matches_anything():
    assert Profile(HANDSET).match({})


def test_match_takes_a_profile_too():
    assert Profile(HANDSET).match(Profile({'type': 'handset', 'serial': 'CB5A'}))


def test_minimize_of_base_keeps_only_type():
    assert Profile(HANDSET).minimize() == {'type': 'handset'}


def test_minimize_keeps_identity_of_a_subclass_and_its_class():
    small = HandsetProfile(HANDSET).minimize()
    assert type(small) is HandsetProfile and small == {'type': 'handset', 'serial': 'CB5A'}


def test_minimize_adds_the_requested_keys_with_values_from_self():
    small = HandsetProfile(HANDSET).minimize({'platform': 'something else'})
    assert small == {'type': 'handset', 'serial': 'CB5A', 'platform': 'android'}, small


def test_minimize_leaves_out_requested_keys_that_self_lacks():
    assert Profile(HANDSET).minimize({'owner': 'x'}) == {'type': 'handset'}


def test_minimize_returns_a_copy_and_leaves_self_alone():
    p = Profile(HANDSET)
    small = p.minimize()
    small['type'] = 'other'
    assert p == HANDSET and small is not p
