"""``meshd new plugin NAME``: a commented plugin, its test and a ``meshd.toml`` to start from.

A shell (it writes files). :func:`new_plugin` owns the name check, the
refusal to overwrite anything and the writing; the templates below are a
small real game (sheep that graze at random and shy away from walkers,
players who walk, a world-state count of visits) whose comments teach the
plugin API. The test template runs it with :mod:`meshd.testing`; both pass
as written (``tests/test_new_plugin.py`` holds them to it).
"""

from __future__ import annotations

import keyword
from pathlib import Path
from string import Template

import attrs

PLUGIN = Template('''\
"""${name}: the game's rules, as a meshd plugin (made by `meshd new plugin ${name}`).

Sheep graze the meadow at random and shy away from walkers; players are
walkers who go where they are told; the meadow counts its visits (world
state). The plugin guide (docs/plugins.md in meshd) explains every part;
`pytest tests/test_${name}.py` tests it, `meshd serve` runs it (meshd.toml).
"""

from __future__ import annotations

import math

import attrs
from meshd import Context, Entity, Event, Kind, Plugin, WorldBuilder, number, takes

SHEEP_SPEED = 1.0  # m/s
WALKER_SPEED = 5.0  # m/s
SHY = 3.0  # metres: a sheep runs from a walker this close


# Settings: [plugins.${name}] in meshd.toml, or MESHD_PLUGINS_${upper}_SHEEP=50.
@attrs.frozen
class Settings:
    sheep: int = 20


# An entity's state: a frozen attrs class of plain values (None, bool, int, float, str,
# bytes, and lists and dicts with str keys of those). Give every field a default: a
# field added later then loads the worlds stored before it.
@attrs.frozen
class Sheep:
    heading: float = 0.0  # radians


@attrs.frozen
class Walker:
    name: str = ""
    vx: float = 0.0
    vy: float = 0.0


# World state: one per plugin, read by every system as ctx.world and sent to players.
@attrs.frozen
class Meadow:
    visits: int = 0


def count_visit(meadow: Meadow, data: None) -> Meadow:
    """A world event: the core runs it when the tick commits, every entity's in one order."""
    return attrs.evolve(meadow, visits=meadow.visits + 1)


# A system runs every tick for each entity of its kind. It reads the previous tick (me as
# it was, ctx.nearby, ctx.world) and writes only its own entity: me.x, me.y, me.state.
def graze(me: Entity, ctx: Context) -> None:
    walkers = ctx.nearby(SHY, "walker")  # sorted by id: the same order on every worker
    if walkers:
        nearest = min(walkers, key=lambda w: (math.hypot(w.x - me.x, w.y - me.y), w.id))
        heading = math.atan2(me.y - nearest.y, me.x - nearest.x)  # away from it
    else:
        # ctx.rng, never the random module or the clock: the world must come out the
        # same on any number of workers and after a restart (meshd check tells).
        heading = me.state.heading + ctx.rng.uniform(-0.3, 0.3)
    me.x += math.cos(heading) * SHEEP_SPEED * ctx.dt
    me.y += math.sin(heading) * SHEEP_SPEED * ctx.dt
    # A state is never changed in place: attrs.evolve makes the next one.
    me.state = attrs.evolve(me.state, heading=heading % math.tau)


def walk(me: Entity, ctx: Context) -> None:
    me.x += me.state.vx * ctx.dt  # meshd keeps positions inside the world
    me.y += me.state.vy * ctx.dt


# A player input: a client's `move {dx, dy}`, run on the player's entity at the next tick.
# takes() declares its arguments: the gateway refuses anything else, naming the argument.
@takes(dx=number(-1.0, 1.0, default=0.0), dy=number(-1.0, 1.0, default=0.0))
def on_move(me: Entity, event: Event, ctx: Context) -> None:
    dx, dy = event.data["dx"], event.data["dy"]
    scale = WALKER_SPEED / max(1.0, math.hypot(dx, dy))
    me.state = attrs.evolve(me.state, vx=dx * scale, vy=dy * scale)


# `join` and `leave` come from the gateway when a player connects and when it goes.
def on_join(me: Entity, event: Event, ctx: Context) -> None:
    ctx.change_world("visit")
    ctx.tell(me.id, {"welcome": me.state.name})  # a Message to this player's client


def on_leave(me: Entity, event: Event, ctx: Context) -> None:
    me.state = attrs.evolve(me.state, vx=0.0, vy=0.0)  # the entity stays; it stops


# The new world (tick 0): world.rng is deterministic too.
def create_world(world: WorldBuilder) -> None:
    for _ in range(world.settings.sheep):
        x, y = world.rng.uniform(0, world.size), world.rng.uniform(0, world.size)
        world.spawn("sheep", x, y, state=Sheep(heading=world.rng.uniform(0, math.tau)))


# Once per new player name: spawn that player's entity (exactly one).
def new_player(name: str, world: WorldBuilder) -> None:
    world.spawn("walker", world.size / 2, world.size / 2, state=Walker(name=name))


plugin = Plugin(
    name="${name}",
    kinds={  # kind names are shared by every loaded plugin
        # max_speed: m/s it may move; radius: how far its systems look with ctx.nearby
        "sheep": Kind(Sheep, systems=(graze,), max_speed=SHEEP_SPEED, radius=SHY),
        "walker": Kind(Walker, systems=(walk,), max_speed=WALKER_SPEED),
    },
    world=Meadow,
    world_events={"visit": count_visit},
    inputs={"move": on_move, "join": on_join, "leave": on_leave},
    create_world=create_world,
    new_player=new_player,
    settings=Settings,
)
''')

TEST = Template('''\
"""The ${name} plugin's rules, tested in-process with meshd.testing (no daemon needed)."""

from __future__ import annotations

from pathlib import Path

import pytest
from meshd.testing import World, assert_deterministic

PLUGINS = [Path(__file__).resolve().parent.parent / "plugins"]


def test_a_player_is_welcomed_counted_and_walks_where_told() -> None:
    world = World(["${name}"], dirs=PLUGINS, settings={"${name}": {"sheep": 0}})
    ann = world.add_player("ann")
    world.step()  # ann joins
    start = world.entity(ann)
    world.send(ann, "move", {"dx": 1.0})
    world.step(10)
    assert world.entity(ann).x == pytest.approx(start.x + 10 * 0.05 * 5.0)
    assert world.world_state("${name}").visits == 1
    assert [message.data for message in world.messages] == [{"welcome": "ann"}]
    assert world.failures == []


def test_a_move_out_of_its_declared_range_is_refused() -> None:
    world = World(["${name}"], dirs=PLUGINS)
    ann = world.add_player("ann")
    with pytest.raises(ValueError, match="argument dx must be -1 to 1"):
        world.send(ann, "move", {"dx": 2.0})


def test_the_world_is_the_same_on_any_workers_and_across_a_restart() -> None:
    assert_deterministic(["${name}"], dirs=PLUGINS, ticks=40)  # meshd check, in one line
''')

CONFIG = Template("""\
# meshd settings for the ${name} world: `meshd serve` in this folder runs it.
# Every setting, and what it means: `meshd serve --help`, and meshd.toml in meshd.

[world]
size = 200.0  # metres: the world is the square [0, size) x [0, size)
seed = 1
halo = 5.0    # at least every kind's radius + max_speed * dt (serve says so if not)

[data]
dir = "data"  # the world and the players' accounts (relative to where meshd runs)

[gateway]
listen = "127.0.0.1:7777"  # players connect here

[plugins]
load = ["${name}"]
dirs = ["plugins"]  # relative to this file

[plugins.${name}]
sheep = 20
""")


class ScaffoldError(Exception):
    """Nothing was written: a file is in the way, or the folder cannot be written."""


class BadName(ScaffoldError):
    """The plugin name is not a Python identifier."""


@attrs.frozen
class Scaffold:
    """What :func:`new_plugin` made."""

    name: str
    folder: Path
    plugin: Path
    test: Path
    config: Path
    config_written: bool
    """False: a ``meshd.toml`` was there already, and was kept as it was."""

    def report(self) -> list[str]:
        """What was written and what to do next, as lines for a terminal."""
        lines = [f"wrote {self.plugin}", f"wrote {self.test}"]
        if self.config_written:
            lines.append(f"wrote {self.config}")
        else:
            lines.append(f'kept {self.config}: add "{self.name}" to its plugins.load to run it')
        where = "" if self.folder == Path(".") else f", in {self.folder}"
        lines.append(f"next{where}: pytest {self.test.relative_to(self.folder)}, then meshd serve")
        return lines


def new_plugin(name: str, folder: Path) -> Scaffold:
    """Write ``plugins/NAME.py`` and ``tests/test_NAME.py`` under ``folder``, and a
    ``meshd.toml`` that loads the plugin unless one is there.

    Raises :class:`BadName` for a name that is not a Python identifier and
    :class:`ScaffoldError` naming the file when the plugin or its test exists
    already (or a file cannot be written); nothing is written then.
    """
    if not name.isidentifier() or keyword.iskeyword(name):
        raise BadName(
            f"plugin name {name!r} is not a Python identifier (letters, digits and "
            "underscores, not starting with a digit, not a keyword)"
        )
    made = Scaffold(
        name,
        folder,
        plugin=folder / "plugins" / f"{name}.py",
        test=folder / "tests" / f"test_{name}.py",
        config=folder / "meshd.toml",
        config_written=not (folder / "meshd.toml").exists(),
    )
    files = {
        made.plugin: PLUGIN.substitute(name=name, upper=name.upper()),
        made.test: TEST.substitute(name=name),
    }
    for path in files:
        if path.exists():
            raise ScaffoldError(f"{path} exists already; nothing was written")
    if made.config_written:
        files[made.config] = CONFIG.substitute(name=name)
    written: list[Path] = []
    try:
        for path, text in files.items():
            path.parent.mkdir(parents=True, exist_ok=True)
            with path.open("x") as out:  # "x": never over a file made meanwhile
                written.append(path)
                out.write(text)
    except OSError as exc:
        for path in written:  # all or nothing
            path.unlink()
        raise ScaffoldError(
            f"cannot write {exc.filename}: {exc.strerror}; nothing was written"
        ) from None
    return made
