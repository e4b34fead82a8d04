"""The view pipeline's pure halves: the core's Publisher and a gateway's Mirror."""

from __future__ import annotations

import random
from typing import Any

import numpy as np

from meshd.common.wire import HEADER, decode_cbor, decode_message
from meshd.players.accounts import resume_token, resumed_entity
from meshd.players.messages import Publish
from meshd.players.protocol import View
from meshd.players.views import Mirror, Publisher


def _to_dict(kind: str, state: tuple[Any, ...]) -> dict[str, Any]:
    return {"kind_was": kind, "values": list(state)}


def _publish(publisher: Publisher, tick: int, records: dict[int, list[Any]]) -> Publish:
    ids, positions, states, gone = publisher.publish(0, tick, records, records.keys())
    return Publish(tick, 0, ids, positions, states, gone)


def _decode(framed: bytes) -> View:
    (length,) = HEADER.unpack_from(framed)
    assert length == len(framed) - HEADER.size
    return decode_message(framed[HEADER.size :], (View,))


def test_a_viewer_sees_enter_update_and_leave_as_the_records_change() -> None:
    records = {
        1: [1, "player", 10.0, 10.0, 0.0, (1,)],
        2: [2, "mug", 12.0, 10.0, 0.0, ("full",)],
        3: [3, "patron", 100.0, 100.0, 0.0, (0,)],  # far away: never in view
    }
    publisher, mirror = Publisher(_to_dict), Mirror()
    mirror.apply(_publish(publisher, 1, records))
    first = _decode(mirror.views([1], [0], radius=30.0, cap=8)[0])
    assert first.tick == 1
    assert [item[0] for item in first.enter] == [1, 2]  # nearest first, itself first
    assert first.enter[1] == [2, "mug", 12.0, 10.0, 0.0, {"kind_was": "mug", "values": ["full"]}]
    assert first.update == [] and first.leave == []

    # the mug moves (state the same: position only); the player's state changes
    records[2] = [2, "mug", 13.5, 10.0, 0.0, ("full",)]
    records[1] = [1, "player", 10.0, 10.0, 0.0, (2,)]
    mirror.apply(_publish(publisher, 2, records))
    second = _decode(mirror.views([1], [7], radius=30.0, cap=8)[0])
    assert second.ack == 7 and second.enter == []
    assert sorted(second.update, key=lambda item: item[0]) == [
        [1, "player", 10.0, 10.0, 0.0, {"kind_was": "player", "values": [2]}],
        [2, 13.5, 10.0, 0.0],
    ]

    # nothing changed: an empty update; then the mug is despawned
    mirror.apply(_publish(publisher, 3, records))
    assert _decode(mirror.views([1], [7], 30.0, 8)[0]).update == []
    del records[2]
    mirror.apply(_publish(publisher, 4, records))
    assert _decode(mirror.views([1], [7], 30.0, 8)[0]).leave == [2]


def test_the_mirror_matches_the_records_through_random_churn() -> None:
    rng = random.Random(5)
    records: dict[int, list[Any]] = {}
    next_id = 1
    publisher, mirror = Publisher(_to_dict), Mirror()
    viewers = [0] * 5
    seen: list[dict[int, list[Any]]] = [{} for _ in viewers]
    for tick in range(1, 60):
        for _ in range(rng.randrange(4) + (12 if tick == 1 else 0)):
            records[next_id] = [next_id, "thing", rng.uniform(0, 60), rng.uniform(0, 60), 0.0, (0,)]
            next_id += 1
        for entity_id in list(records):
            roll = rng.random()
            if roll < 0.05 and len(records) > 12:
                del records[entity_id]
            elif roll < 0.6:
                _, kind, x, y, z, state = records[entity_id]
                if roll < 0.1:
                    state = (state[0] + 1,)
                records[entity_id] = [entity_id, kind, x + rng.uniform(-2, 2), y, z, state]
        for index, viewer in enumerate(viewers):
            if viewer not in records:  # its entity left: a new player takes its place
                viewers[index] = sorted(set(records) - set(viewers))[0]
                seen[index] = {}
        mirror.apply(_publish(publisher, tick, records))
        frames = mirror.views(viewers, [0] * len(viewers), radius=25.0, cap=6)
        for index, (viewer, body) in enumerate(zip(viewers, frames, strict=True)):
            view, world = _decode(body), seen[index]
            for entity_id in view.leave:
                del world[entity_id]
            for item in [*view.enter, *view.update]:
                if len(item) == 4:
                    world[item[0]][2:5] = item[1:]
                else:
                    world[item[0]] = list(item)
            own = records[viewer]
            expected = sorted(
                (r for r in records.values() if np.hypot(r[2] - own[2], r[3] - own[3]) <= 25.0),
                key=lambda r: (np.hypot(r[2] - own[2], r[3] - own[3]), r[0] != own[0]),
            )[:6]
            assert set(world) == {r[0] for r in expected}
            for entity_id, item in world.items():
                record = records[entity_id]
                # positions travel as single-precision floats
                assert np.allclose(item[2:5], record[2:5], atol=1e-3)
                assert item[5] == _to_dict(record[1], record[5])


def test_items_of_large_ids_take_eight_bytes() -> None:
    big = (1 << 40) + 3
    records = {big: [big, "player", 1.0, 2.0, 0.0, (1,)]}
    publisher, mirror = Publisher(_to_dict), Mirror()
    mirror.apply(_publish(publisher, 1, records))
    records[big] = [big, "player", 1.5, 2.0, 0.0, (1,)]
    mirror.apply(_publish(publisher, 2, records))
    mirror.views([big], [0], 10.0, 4)
    mirror.apply(_publish(publisher, 3, {big: [big, "player", 1.5, 2.0, 0.0, (1,)]}))
    framed = mirror.views([big], [0], 10.0, 4)[0]
    assert decode_cbor(framed[HEADER.size :])["update"] == [[big, 1.5, 2.0, 0.0]]


def test_a_resume_token_proves_the_name_it_was_made_for() -> None:
    key = b"k" * 32
    token = resume_token(key, "ada", 42)
    assert resumed_entity(key, "ada", token) == 42
    assert resumed_entity(key, "bob", token) is None
    assert resumed_entity(b"x" * 32, "ada", token) is None  # another core run
    assert resumed_entity(key, "ada", token.replace("42.", "43.")) is None
    for junk in ("", ".", "42", "-1.ab", "9" * 40 + ".00", "42." + "0" * 64):
        assert resumed_entity(key, "ada", junk) is None
