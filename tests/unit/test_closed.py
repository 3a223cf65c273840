"""AppendOnlyMap: behaves as a dict that is only added to, and its copies are independent."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from backend.domain.closed import HEAD_SIZE, AppendOnlyMap

# (copy?, which map, key, value): a copy of that map, or a set in it; keys collide often enough to shadow.
operations = st.lists(st.tuples(st.booleans(), st.integers(0, 5), st.integers(0, 300), st.integers()), max_size=400)


@given(operations)
def test_every_copy_matches_its_own_dict(ops: list[tuple[bool, int, int, int]]) -> None:
    maps: list[AppendOnlyMap[int, int]] = [AppendOnlyMap()]
    models: list[dict[int, int]] = [{}]
    for copy, pick, key, value in ops:
        which = pick % len(maps)
        if copy:
            maps.append(maps[which].copy())
            models.append(dict(models[which]))
        else:
            maps[which][key] = value
            models[which][key] = value
    for m, model in zip(maps, models, strict=True):
        assert m == model and dict(m) == model and len(m) == len(model) and bool(m) == bool(model)
        for key in range(-1, 302):
            assert (key in m) == (key in model)
            assert m.get(key) == model.get(key)


def test_levels_stay_logarithmic_and_copies_share_them() -> None:
    m: AppendOnlyMap[int, str] = AppendOnlyMap()
    for i in range(100_000):
        m[i] = "closed"
    assert len(m._levels) <= (100_000 // HEAD_SIZE).bit_length()
    assert len(m._head) < HEAD_SIZE
    copied = m.copy()
    assert copied._levels is m._levels  # nothing of the past is copied
    copied[-1] = "new"
    assert -1 not in m and copied[-1] == "new" and len(copied) == len(m) + 1


def test_built_from_items_in_one_level() -> None:
    m = AppendOnlyMap([(1, "a"), (2, "b")])
    assert m == {1: "a", 2: "b"} and len(m._levels) == 1 and repr(m) == "AppendOnlyMap({1: 'a', 2: 'b'})"
    assert AppendOnlyMap() == {} and not AppendOnlyMap()
