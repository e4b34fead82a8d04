"""Space: ships drift and fire rockets that cross whole partitions in one tick.

Rockets fly 300 m per tick (6 km/s at dt = 0.05 s), farther than a
partition is wide in the default layout, so a rocket fired in partition A
can cross B and hit a ship in C within a tick. The hit is resolved by the
rocket's owner against the ship's ghost and sent to the ship's owner as a
``rocket_hit`` event: exactly once.

Scenario ``duel`` (for tests): ship 1 at (800, 1000), ship 2 at (1650, 1000),
and one rocket leaving ship 1 towards ship 2.
"""

from __future__ import annotations

import math

import attrs

from meshd import Context, Entity, Event, Kind, Plugin, WorldBuilder, first_hit

SHIP_SPEED = 100.0  # m/s
SCAN_RANGE = 250.0
ROCKET_SPEED = 6000.0  # m/s
ROCKET_HIT_RADIUS = 15.0
ROCKET_DAMAGE = 1


@attrs.frozen
class SpaceSettings:
    ships: int = 200
    scenario: str = attrs.field(
        default="battle", validator=attrs.validators.in_(("battle", "duel"))
    )
    fire_chance: float = 0.02


@attrs.frozen
class Ship:
    vx: float = 0.0
    vy: float = 0.0
    hp: int = 10
    hits: int = 0
    cooldown: int = 0
    fired: int = 0


@attrs.frozen
class Rocket:
    vx: float = 0.0
    vy: float = 0.0
    ttl: int = 8
    shooter: int = 0


def ship(me: Entity, ctx: Context) -> None:
    state: Ship = me.state
    size, dt = ctx.world_size, ctx.dt
    vx, vy = state.vx, state.vy
    if not 0 <= me.x + vx * dt < size:
        vx = -vx
    if not 0 <= me.y + vy * dt < size:
        vy = -vy
    me.x += vx * dt
    me.y += vy * dt
    cooldown, fired = max(state.cooldown - 1, 0), state.fired
    settings: SpaceSettings = ctx.settings
    if cooldown == 0 and state.hp > 0 and ctx.rng.random() < settings.fire_chance:
        targets = ctx.nearby(SCAN_RANGE, "ship")
        if targets:
            target = min(targets, key=lambda t: ((t.x - me.x) ** 2 + (t.y - me.y) ** 2, t.id))
            angle = math.atan2(target.y - me.y, target.x - me.x)
            ctx.spawn(
                "rocket",
                me.x,
                me.y,
                state=Rocket(
                    vx=math.cos(angle) * ROCKET_SPEED,
                    vy=math.sin(angle) * ROCKET_SPEED,
                    shooter=me.id,
                ),
            )
            cooldown, fired = 20, fired + 1
    me.state = attrs.evolve(state, vx=vx, vy=vy, cooldown=cooldown, fired=fired)


def rocket(me: Entity, ctx: Context) -> None:
    state: Rocket = me.state
    x0, y0 = me.x, me.y
    x1, y1 = x0 + state.vx * ctx.dt, y0 + state.vy * ctx.dt
    half = math.hypot(x1 - x0, y1 - y0) / 2
    candidates = ctx.nearby(half + ROCKET_HIT_RADIUS, "ship", x=(x0 + x1) / 2, y=(y0 + y1) / 2)
    hit = first_hit(x0, y0, x1, y1, candidates, ROCKET_HIT_RADIUS, skip=state.shooter)
    if hit is not None:
        ctx.send(hit, "rocket_hit", {"rocket": me.id, "shooter": state.shooter})
        ctx.despawn()
        return
    size = ctx.world_size
    if state.ttl <= 1 or not (0 <= x1 < size and 0 <= y1 < size):
        ctx.despawn()
        return
    me.x, me.y = x1, y1
    me.state = attrs.evolve(state, ttl=state.ttl - 1)


def on_rocket_hit(me: Entity, event: Event, ctx: Context) -> None:
    if me.kind == "ship":
        state: Ship = me.state
        me.state = attrs.evolve(state, hp=max(state.hp - ROCKET_DAMAGE, 0), hits=state.hits + 1)


def create_world(world: WorldBuilder) -> None:
    settings: SpaceSettings = world.settings
    if settings.scenario == "duel":
        world.spawn("ship", 800.0, 1000.0, state=Ship(cooldown=10**9))
        world.spawn("ship", 1650.0, 1000.0, state=Ship(cooldown=10**9))
        world.spawn("rocket", 800.0, 1000.0, state=Rocket(vx=ROCKET_SPEED, shooter=1))
        return
    rng = world.rng
    for _ in range(settings.ships):
        angle = rng.uniform(0, math.tau)
        speed = rng.uniform(0.2, 1.0) * SHIP_SPEED
        world.spawn(
            "ship",
            rng.uniform(0, world.size),
            rng.uniform(0, world.size),
            state=Ship(vx=math.cos(angle) * speed, vy=math.sin(angle) * speed),
        )


plugin = Plugin(
    name="space",
    kinds={
        "ship": Kind(Ship, systems=(ship,), max_speed=SHIP_SPEED, radius=SCAN_RANGE),
        "rocket": Kind(Rocket, systems=(rocket,), max_speed=ROCKET_SPEED, radius=ROCKET_HIT_RADIUS),
    },
    events={"rocket_hit": on_rocket_hit},
    create_world=create_world,
    settings=SpaceSettings,
)
