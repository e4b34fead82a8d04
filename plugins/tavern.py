"""The tavern: NPC patrons wander, sour each other's mood, throw bottles and drop mugs.

Everything here exercises a mesh guarantee:

- patrons read their neighbours (``ctx.nearby``), which near a partition
  edge are ghosts owned by another worker;
- bottles fly 2 m per tick, cross partitions and hit patrons owned by other
  workers through a ``bottle_hit`` event, resolved exactly once;
- mugs never move and never tick: they stay where they fell, forever.
"""

from __future__ import annotations

import math

import attrs

from meshd import Context, Entity, Event, Kind, Plugin, WorldBuilder, first_hit

PERCEPTION = 4.0  # metres a patron looks around
PERSONAL_SPACE = 1.0
PATRON_SPEED = 2.5  # m/s, including being jostled
BOTTLE_SPEED = 40.0  # m/s
BOTTLE_HIT_RADIUS = 0.6


@attrs.frozen
class TavernSettings:
    npcs: int = 2000
    tavern_radius: float = 25.0
    crowd_share: float = 0.3
    throw_chance: float = 0.01
    drop_chance: float = 0.0005


@attrs.frozen
class Patron:
    heading: float = 0.0
    anger: float = 0.0
    hp: int = 5
    has_mug: bool = True
    knocked_out: int = 0
    hits: int = 0


@attrs.frozen
class Bottle:
    vx: float = 0.0
    vy: float = 0.0
    ttl: int = 15
    thrower: int = 0


@attrs.frozen
class Mug:
    dropped_by: int = 0
    dropped_at: int = 0


def _drop_mug(me: Entity, ctx: Context) -> None:
    ctx.spawn("mug", me.x, me.y, state=Mug(dropped_by=me.id, dropped_at=ctx.tick))
    me.state = attrs.evolve(me.state, has_mug=False)


def patron(me: Entity, ctx: Context) -> None:
    state: Patron = me.state
    if state.knocked_out:
        left = state.knocked_out - 1
        me.state = attrs.evolve(state, knocked_out=left, hp=5 if left == 0 else 0)
        return
    settings: TavernSettings = ctx.settings
    rng = ctx.rng
    neighbours = ctx.nearby(PERCEPTION, "patron")
    push_x = push_y = 0.0
    loudest = 0.0
    for other in neighbours:
        dx, dy = me.x - other.x, me.y - other.y
        d2 = dx * dx + dy * dy
        if 1e-12 < d2 < PERSONAL_SPACE * PERSONAL_SPACE:
            push_x += dx / d2 * 0.05
            push_y += dy / d2 * 0.05
        loudest = max(loudest, other.state.anger)
    anger = 0.95 * state.anger + 0.04 * loudest
    if rng.random() < 0.002:
        anger = 1.0
    heading = state.heading + rng.uniform(-0.4, 0.4)
    centre = ctx.world_size / 2
    to_x, to_y = centre - me.x, centre - me.y
    if to_x * to_x + to_y * to_y > settings.tavern_radius**2:
        heading += 0.05 * math.sin(math.atan2(to_y, to_x) - heading)
    step = 1.2 * ctx.dt
    move_x = math.cos(heading) * step + push_x
    move_y = math.sin(heading) * step + push_y
    length = math.hypot(move_x, move_y)
    limit = PATRON_SPEED * ctx.dt
    if length > limit:
        move_x, move_y = move_x * limit / length, move_y * limit / length
    me.x += move_x
    me.y += move_y
    if neighbours and anger > 0.5 and rng.random() < settings.throw_chance * anger:
        target = rng.choice(neighbours)
        angle = math.atan2(target.y - me.y, target.x - me.x)
        ctx.spawn(
            "bottle",
            me.x,
            me.y,
            state=Bottle(
                vx=math.cos(angle) * BOTTLE_SPEED, vy=math.sin(angle) * BOTTLE_SPEED, thrower=me.id
            ),
        )
        anger *= 0.5
    me.state = attrs.evolve(state, heading=heading % math.tau, anger=anger)
    if state.has_mug and rng.random() < settings.drop_chance:
        _drop_mug(me, ctx)


def bottle(me: Entity, ctx: Context) -> None:
    state: Bottle = me.state
    x0, y0 = me.x, me.y
    x1, y1 = x0 + state.vx * ctx.dt, y0 + state.vy * ctx.dt
    half = math.hypot(x1 - x0, y1 - y0) / 2
    candidates = ctx.nearby(half + BOTTLE_HIT_RADIUS, "patron", x=(x0 + x1) / 2, y=(y0 + y1) / 2)
    hit = first_hit(x0, y0, x1, y1, candidates, BOTTLE_HIT_RADIUS, skip=state.thrower)
    if hit is not None:
        ctx.send(hit, "bottle_hit", {"bottle": me.id, "thrower": state.thrower})
        ctx.despawn()
        return
    size = ctx.world_size
    if state.ttl <= 1 or not (0 <= x1 < size and 0 <= y1 < size):
        ctx.despawn()
        return
    me.x, me.y = x1, y1
    me.state = attrs.evolve(state, ttl=state.ttl - 1)


def on_bottle_hit(me: Entity, event: Event, ctx: Context) -> None:
    if me.kind != "patron":
        return
    state: Patron = me.state
    hp = state.hp - 1
    me.state = attrs.evolve(
        state,
        hp=max(hp, 0),
        hits=state.hits + 1,
        anger=min(1.0, state.anger + 0.5),
        knocked_out=40 if hp <= 0 and not state.knocked_out else state.knocked_out,
    )
    if hp <= 0 and state.has_mug:
        _drop_mug(me, ctx)


def create_world(world: WorldBuilder) -> None:
    settings: TavernSettings = world.settings
    rng, size = world.rng, world.size
    centre = size / 2
    for i in range(settings.npcs):
        if i < settings.npcs * settings.crowd_share:
            angle, radius = rng.uniform(0, math.tau), settings.tavern_radius * 2 * rng.random()
            x, y = centre + math.cos(angle) * radius, centre + math.sin(angle) * radius
        else:
            x, y = rng.uniform(0, size), rng.uniform(0, size)
        world.spawn("patron", x, y, state=Patron(heading=rng.uniform(0, math.tau)))


plugin = Plugin(
    name="tavern",
    kinds={
        "patron": Kind(Patron, systems=(patron,), max_speed=PATRON_SPEED, radius=PERCEPTION),
        "bottle": Kind(Bottle, systems=(bottle,), max_speed=BOTTLE_SPEED, radius=BOTTLE_HIT_RADIUS),
        "mug": Kind(Mug),
    },
    events={"bottle_hit": on_bottle_hit},
    create_world=create_world,
    settings=TavernSettings,
)
