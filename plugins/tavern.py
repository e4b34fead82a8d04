"""The tavern: NPC patrons wander, sour each other's mood, throw bottles and drop mugs.

Two scenarios load the mesh the way real crowds do: a *rush* (at tick
``rush_at`` most patrons run into the tavern, stay ``rush_ticks`` ticks, then
run home) and a *day cycle* (patrons fall asleep at night and wake up by
day, so the simulated population rises and falls every ``day_ticks``).

Everything here exercises a mesh guarantee:

- patrons read their neighbours (``ctx.nearby``), which near a partition
  edge are ghosts owned by another worker;
- bottles fly 2 m per tick, cross partitions and hit patrons owned by other
  workers through a ``bottle_hit`` event, resolved exactly once;
- mugs never move and never tick: they stay where they fell, forever;
- players (see ``new_player`` and ``inputs``) walk, throw bottles, drop mugs
  and pick them up again, through the client gateway.
"""

from __future__ import annotations

import math
import time

import attrs

from meshd import Context, Entity, Event, Kind, Plugin, WorldBuilder, first_hit, number, takes

PERCEPTION = 4.0  # metres a patron looks around
PERSONAL_SPACE = 1.0
WALK_SPEED = 2.5  # m/s, including being jostled
RUN_SPEED = 12.0  # m/s, rushing to the tavern or home
BOTTLE_SPEED = 40.0  # m/s
BOTTLE_HIT_RADIUS = 0.6


@attrs.frozen
class TavernSettings:
    npcs: int = 2000
    tavern_x: float = 0.5  # where the tavern stands, as a share of the world size
    tavern_y: float = 0.5
    tavern_radius: float = 25.0
    crowd_share: float = 0.3
    throw_chance: float = 0.01
    drop_chance: float = 0.0005
    rush_at: int = 0  # tick the rush starts; 0 = no rush
    rush_ticks: int = 400  # how long the crowd stays, and how long it takes to disperse
    rush_share: float = 0.8  # share of patrons that join the rush
    day_ticks: int = 0  # length of a day in ticks; 0 = everyone always awake
    night_awake: float = 0.2  # share of patrons awake at midnight (all are at noon)
    day_shape: float = 1.0  # > 1: fewer busy hours, a sharper evening peak
    work_us: float = 0.0  # CPU microseconds each awake patron spends per tick on top of its
    # rules: stands in for a heavier game in load tests, at the same cost on any machine


def _work(microseconds: float) -> None:
    """Spend this much of the thread's CPU time (changes nothing in the world)."""
    until = time.thread_time_ns() + int(microseconds * 1000)
    while time.thread_time_ns() < until:
        pass


def _share(entity_id: int, step: float) -> float:
    """A fixed number in [0, 1) per patron, evenly spread over patrons (Weyl sequence)."""
    return (entity_id * step) % 1.0


def awake_share(settings: TavernSettings, tick: int) -> float:
    """Share of patrons awake at ``tick``: lowest at midnight (tick 0), all at noon."""
    if settings.day_ticks <= 0:
        return 1.0
    daylight = ((1 - math.cos(math.tau * tick / settings.day_ticks)) / 2) ** settings.day_shape
    return settings.night_awake + (1 - settings.night_awake) * daylight


def _errand(me: Entity, ctx: Context, settings: TavernSettings) -> tuple[float, float] | None:
    """Where a patron is running to right now (the tavern, or home after a rush), if anywhere."""
    since = ctx.tick - settings.rush_at
    if settings.rush_at <= 0 or since < 0 or since >= 2 * settings.rush_ticks:
        return None
    if _share(me.id, 0.7548776662466927) >= settings.rush_share:
        return None
    size = ctx.world_size
    if since < settings.rush_ticks:
        return settings.tavern_x * size, settings.tavern_y * size
    return _share(me.id, 0.5698402909980532) * size, _share(me.id, 0.3819660112501051) * size


def _run_towards(me: Entity, ctx: Context, x: float, y: float, stop: float) -> bool:
    """Run straight at (x, y) until within ``stop`` metres; False once there."""
    dx, dy = x - me.x, y - me.y
    distance = math.hypot(dx, dy)
    if distance <= stop:
        return False
    stride = min(RUN_SPEED * ctx.dt, distance - stop)
    me.x += dx / distance * stride
    me.y += dy / distance * stride
    me.state = attrs.evolve(me.state, heading=math.atan2(dy, dx) % math.tau)
    return True


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
    taken: bool = False


@attrs.frozen
class Player:
    """A connected (or sleeping) player: walks where told, throws, drops and picks up mugs."""

    name: str = ""
    vx: float = 0.0
    vy: float = 0.0
    hp: int = 5
    hits: int = 0
    has_mug: bool = True
    away: bool = False


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
    if _share(me.id, 0.6180339887498949) >= awake_share(settings, ctx.tick):
        return  # asleep: costs nothing
    if settings.work_us:
        _work(settings.work_us)
    errand = _errand(me, ctx, settings)
    if errand is not None and _run_towards(me, ctx, *errand, stop=settings.tavern_radius / 2):
        return
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
    to_x = settings.tavern_x * ctx.world_size - me.x
    to_y = settings.tavern_y * ctx.world_size - me.y
    if to_x * to_x + to_y * to_y > settings.tavern_radius**2:
        heading += 0.05 * math.sin(math.atan2(to_y, to_x) - heading)
    step = 1.2 * ctx.dt
    move_x = math.cos(heading) * step + push_x
    move_y = math.sin(heading) * step + push_y
    length = math.hypot(move_x, move_y)
    limit = WALK_SPEED * ctx.dt
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


PLAYER_SPEED = 5.0  # m/s
REACH = 1.5  # metres a player can pick a mug up from


def player(me: Entity, ctx: Context) -> None:
    state: Player = me.state
    if state.vx or state.vy:
        me.x += state.vx * ctx.dt
        me.y += state.vy * ctx.dt


def _number(event: Event, name: str) -> float:
    """Argument ``name`` of a player's input (default 0). A wrong one raises an error
    naming it: meshd undoes the input and sends the player that message."""
    value = event.data.get(name, 0.0)
    if type(value) not in (int, float):  # (the gateway already refused NaN and infinity)
        raise ValueError(f"{name} must be a number, got {value!r}")
    return float(value)


def on_move(me: Entity, event: Event, ctx: Context) -> None:
    """``move {dx, dy}``: walk that way at full speed (0, 0 stops)."""
    dx, dy = _number(event, "dx"), _number(event, "dy")
    length = math.hypot(dx, dy)
    scale = PLAYER_SPEED / length if length > 1e-9 else 0.0
    me.state = attrs.evolve(me.state, vx=dx * scale, vy=dy * scale)


# `throw`, `drop` and `pick_up` declare their arguments: the gateway refuses anything
# else, naming the argument. `move` checks its own, to show the other way.
@takes(angle=number(-1e6, 1e6))
def on_throw(me: Entity, event: Event, ctx: Context) -> None:
    """``throw {angle}``: a bottle flies off at ``angle`` radians."""
    angle = event.data["angle"]
    velocity = (math.cos(angle) * BOTTLE_SPEED, math.sin(angle) * BOTTLE_SPEED)
    ctx.spawn("bottle", me.x, me.y, state=Bottle(vx=velocity[0], vy=velocity[1], thrower=me.id))


@takes()
def on_drop(me: Entity, event: Event, ctx: Context) -> None:
    """``drop``: put the mug down here; it stays, forever."""
    if me.state.has_mug:
        _drop_mug(me, ctx)


@takes()
def on_pick_up(me: Entity, event: Event, ctx: Context) -> None:
    """``pick_up``: ask the nearest mug within reach to come along (next tick)."""
    if me.state.has_mug:
        return
    mugs = ctx.nearby(REACH, "mug")
    if mugs:
        nearest = min(mugs, key=lambda m: ((m.x - me.x) ** 2 + (m.y - me.y) ** 2, m.id))
        ctx.send(nearest.id, "pick_up", {"by": me.id})


def on_mug_picked(me: Entity, event: Event, ctx: Context) -> None:
    if me.kind != "mug" or me.state.taken:
        return  # a second taker in the same tick gets nothing
    me.state = attrs.evolve(me.state, taken=True)
    ctx.send(event.data["by"], "got_mug")
    ctx.despawn()


def on_got_mug(me: Entity, event: Event, ctx: Context) -> None:
    if me.kind == "player":
        me.state = attrs.evolve(me.state, has_mug=True)


def on_join(me: Entity, event: Event, ctx: Context) -> None:
    me.state = attrs.evolve(me.state, away=False)


def on_leave(me: Entity, event: Event, ctx: Context) -> None:
    me.state = attrs.evolve(me.state, away=True, vx=0.0, vy=0.0)


def new_player(name: str, world: WorldBuilder) -> None:
    """A new player walks in at the tavern's door."""
    settings: TavernSettings = world.settings
    x = settings.tavern_x * world.size + world.rng.uniform(-2.0, 2.0)
    y = settings.tavern_y * world.size - settings.tavern_radius
    world.spawn("player", x, y, state=Player(name=name))


def on_bottle_hit(me: Entity, event: Event, ctx: Context) -> None:
    if me.kind == "player":
        me.state = attrs.evolve(me.state, hp=max(me.state.hp - 1, 0), hits=me.state.hits + 1)
        return
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
    tavern_x, tavern_y = settings.tavern_x * size, settings.tavern_y * size
    for i in range(settings.npcs):
        if i < settings.npcs * settings.crowd_share:
            angle, radius = rng.uniform(0, math.tau), settings.tavern_radius * 2 * rng.random()
            x, y = tavern_x + math.cos(angle) * radius, tavern_y + math.sin(angle) * radius
        else:
            x, y = rng.uniform(0, size), rng.uniform(0, size)
        world.spawn("patron", x, y, state=Patron(heading=rng.uniform(0, math.tau)))


plugin = Plugin(
    name="tavern",
    kinds={
        "patron": Kind(Patron, systems=(patron,), max_speed=RUN_SPEED, radius=PERCEPTION),
        "bottle": Kind(Bottle, systems=(bottle,), max_speed=BOTTLE_SPEED, radius=BOTTLE_HIT_RADIUS),
        "mug": Kind(Mug),
        "player": Kind(
            Player, systems=(player,), max_speed=PLAYER_SPEED, radius=REACH, colour="crimson"
        ),
    },
    events={"bottle_hit": on_bottle_hit, "pick_up": on_mug_picked, "got_mug": on_got_mug},
    create_world=create_world,
    settings=TavernSettings,
    new_player=new_player,
    inputs={
        "move": on_move,
        "throw": on_throw,
        "drop": on_drop,
        "pick_up": on_pick_up,
        "join": on_join,
        "leave": on_leave,
    },
)
