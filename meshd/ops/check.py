"""``meshd check``: the configured world run several ways, compared after every tick.

A plugin keeps meshd's promise (the world depends only on its seed, its
plugins and its inputs) only if its rules read nothing but their entity,
``ctx`` and their settings. This runs the world in-process
(:mod:`meshd.mesh.inprocess`, the real tick pipeline and workers' code), each
way in its own Python process with its own string-hash seed:

- twice on one worker (the same run in two processes),
- on four workers with a random static layout,
- on two workers with a new random layout a third of the way through and a
  worker killed (restored from its checkpoint, the steps replayed) halfway,
- on one worker stopped halfway, saved to a real ``world.db`` and restarted
  from it in a new process.

After every tick each way digests every entity (:func:`records_digest`);
at the first tick where a way differs from the first, both are run again to
that tick and the entities compared field by field. Meanwhile
:mod:`meshd.mesh.guards` notes plugin code that read the clock or the global
random generator or changed a previous state in place, and those are named
first among the likely causes.

The shell is :func:`check` (subprocesses, a thread each); a way runs in
:func:`run_way`, in the child (``python -m meshd.ops.check``). It is long
because the ways, the child that runs one and the report that compares them
change together: a new way needs all three.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import tempfile
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import attrs
import cbor2

from meshd.common.config import Config
from meshd.common.wire import CONVERTER
from meshd.mesh.guards import Findings, guard_state, watch_ambient
from meshd.mesh.inprocess import InProcessMesh, new_world, records_digest
from meshd.mesh.layout import Layout
from meshd.mesh.messages import WorldParams
from meshd.mesh.plugins import load_plugins
from meshd.store.codec import Delta
from meshd.store.db import DB_NAME, Store

DEFAULT_TICKS = 200
"""About 20 s for the default world (2,000 patrons) on two cores."""
CHECKPOINT_EVERY = 10
"""As ``tick.checkpoint_every``'s default: a killed worker replays up to nine steps."""
SHOWN_ENTITIES = 5


@attrs.frozen
class WorldSpec:
    """What a child needs to build the world: the plugins, their settings, the world."""

    plugins: list[str]
    dirs: list[str]
    settings: dict[str, dict[str, Any]]
    size: float
    seed: int
    dt: float
    halo: float

    @classmethod
    def from_config(cls, config: Config) -> WorldSpec:
        world = config.world
        return cls(
            plugins=list(config.plugins.load),
            dirs=[str(folder) for folder in config.plugin_dirs],
            settings={name: dict(value) for name, value in config.plugins.settings.items()},
            size=world.size,
            seed=world.seed,
            dt=world.dt,
            halo=world.halo,
        )

    @property
    def world(self) -> WorldParams:
        return WorldParams(size=self.size, seed=self.seed, dt=self.dt, halo=self.halo)


@attrs.frozen
class Way:
    """One way of running the world."""

    name: str
    description: str
    hash_seed: int
    workers: int = 1
    grid: int = 1
    layout_seed: int = 0
    """Partitions are given to workers at random from this seed (0: the plain grid)."""
    relayout_at: int = 0
    kill_at: int = 0
    restart_at: int = 0


def ways(ticks: int) -> list[Way]:
    """The ways :func:`check` runs, the reference first."""
    third, half = max(1, ticks // 3), max(1, ticks // 2)
    return [
        Way("one worker", "1 worker", hash_seed=1),
        Way("one worker again", "1 worker, another process", hash_seed=2),
        Way("four workers", "4 workers, 16 partitions at random", 3, 4, 4, layout_seed=7),
        Way(
            "re-layout and kill",
            f"2 workers, re-laid out at {third}, kill at {half}",
            4,
            2,
            4,
            layout_seed=11,
            relayout_at=third,
            kill_at=half,
        ),
        Way(
            "restart",
            f"stopped at {half}, restarted from {DB_NAME}",
            5,
            restart_at=half,
        ),
    ]


def _layout(world: WorldParams, way: Way, shuffle: int) -> Layout:
    layout = Layout.grid(world.size, world.halo, way.grid, way.workers)
    if not shuffle:
        return layout
    leaves = sorted(layout.owners)
    rng = random.Random(shuffle)
    # Every worker keeps at least one partition; the rest go anywhere.
    owners = list(range(way.workers)) + [
        rng.randrange(way.workers) for _ in range(len(leaves) - way.workers)
    ]
    rng.shuffle(owners)
    return Layout(world.size, world.halo, dict(zip(leaves, owners, strict=True)))


@attrs.define
class WayResult:
    digests: list[str] = attrs.field(factory=list)
    findings: list[tuple[str, str, int]] = attrs.field(factory=list)
    records: dict[int, list[Any]] | None = None
    """The entities after the tick asked for, if any."""


@attrs.frozen
class Run:
    """One run of a way, as the child is asked for it."""

    way: Way
    ticks: int
    dump_at: int = 0
    """Keep every entity after this tick (0: none)."""
    data_dir: str | None = None
    """Where a restarting way keeps its ``world.db``."""
    resume: bool = False
    """The second half of a restarting way: load the world from ``data_dir``."""


def run_way(spec: WorldSpec, run: Run) -> WayResult:
    """Run a way (in this process): every tick's digest, what the guards noticed.

    A restarting way runs twice: the first stops after ``way.restart_at``
    with the world saved in ``data_dir``; the second (``resume``) loads it
    from there and runs the remaining ticks.
    """
    way, ticks, dump_at, resume = run.way, run.ticks, run.dump_at, run.resume
    data_dir = None if run.data_dir is None else Path(run.data_dir)
    findings: Findings = Findings()
    result = WayResult()
    with watch_ambient(findings):
        plugins = load_plugins(spec.plugins, [Path(d) for d in spec.dirs], spec.settings, CONVERTER)
        guard_state(plugins, findings)
        world = spec.world
        store = Store(data_dir / DB_NAME) if data_dir is not None else None
        try:
            if resume:
                assert store is not None
                snapshot = store.load_world(plugins.codecs)
                assert snapshot is not None, "the first half saved no world"
            else:
                snapshot = new_world(plugins, world)
                if store is not None:
                    store.write(
                        Delta(0, world.seed, snapshot.next_id, [], snapshot.records, []),
                        plugins.schema(),
                    )
            mesh = InProcessMesh(plugins, world, _layout(world, way, way.layout_seed), snapshot)
            last = way.restart_at if way.restart_at and not resume else ticks
            for tick in range(snapshot.tick + 1, last + 1):
                stop = tick == last and bool(way.restart_at) and not resume
                mesh.tick(
                    checkpoint=tick % CHECKPOINT_EVERY == 0 or tick == way.relayout_at or stop,
                    kill=frozenset({0}) if tick == way.kill_at else frozenset(),
                )
                records, world_state = mesh.records(), mesh.replication.world_fields()
                result.digests.append(records_digest(records, world_state))
                if tick == dump_at:
                    # The world state rides along as a pseudo-entity 0 ("world"): ids start at 1.
                    result.records = {**records, 0: [0, "world", 0.0, 0.0, 0.0, world_state]}
                if tick == way.relayout_at:
                    mesh.relayout(_layout(world, way, way.layout_seed + 1))
                if stop:
                    assert store is not None
                    store.write(mesh.replication.take_delta(), plugins.schema())
        finally:
            if store is not None:
                store.close()
    result.findings = [(what, where, count) for (what, where), count in findings.items()]
    return result


@attrs.frozen
class Difference:
    """The first tick where a way's world is not the reference's, entity by entity."""

    tick: int
    way: str
    entities: list[dict[str, Any]]
    """Per differing entity (lowest ids first): id, kind, and the fields that differ."""


@attrs.frozen
class CheckReport:
    spec: WorldSpec
    ticks: int
    ways: list[Way]
    first_differing_tick: dict[str, int | None]
    """Per way: the first tick its world differs from the reference's (None: never)."""
    difference: Difference | None
    findings: list[tuple[str, str, int]]
    """What the guards noticed in any way: (what, where, count)."""
    causes: list[str]

    @property
    def same(self) -> bool:
        return self.difference is None

    def to_json(self) -> dict[str, Any]:
        return {
            "same": self.same,
            "plugins": self.spec.plugins,
            "seed": self.spec.seed,
            "ticks": self.ticks,
            "ways": [
                {
                    "name": way.name,
                    "description": way.description,
                    "first_differing_tick": self.first_differing_tick[way.name],
                }
                for way in self.ways
            ],
            "difference": attrs.asdict(self.difference) if self.difference else None,
            "findings": [
                {"what": what, "where": where, "count": count}
                for what, where, count in self.findings
            ],
            "likely_causes": self.causes,
        }


CHILD_TIMEOUT = 1800.0
"""Seconds a way may take: more means a system that never returns."""


def _child(spec: WorldSpec, run: Run) -> WayResult:
    """:func:`run_way` in a new Python process with the way's own string-hash seed.

    The answer comes back in a file: whatever the plugins print stays out of it.
    """
    env = dict(os.environ, PYTHONHASHSEED=str(run.way.hash_seed))
    with tempfile.TemporaryDirectory(prefix="meshd-check-") as folder:
        answer = Path(folder) / "answer.cbor"
        request = {"spec": attrs.asdict(spec), "run": attrs.asdict(run), "answer": str(answer)}
        try:
            done = subprocess.run(
                [sys.executable, "-m", "meshd.ops.check"],
                input=json.dumps(request).encode(),
                capture_output=True,
                env=env,
                check=False,
                timeout=CHILD_TIMEOUT,
            )
        except subprocess.TimeoutExpired:
            raise CheckFailed(
                f"way {run.way.name!r} did not finish in {CHILD_TIMEOUT:g} s "
                "(a system or handler that never returns?)"
            ) from None
        if done.returncode != 0 or not answer.exists():
            lines = done.stderr.decode(errors="replace").strip().splitlines()
            last = lines[-1] if lines else f"exit status {done.returncode}, no output"
            raise CheckFailed(f"way {run.way.name!r} could not run: {last}")
        result = cbor2.loads(answer.read_bytes())
    return WayResult(
        digests=result["digests"],
        findings=[tuple(finding) for finding in result["findings"]],
        records=None
        if result["records"] is None
        else {int(key): value for key, value in result["records"].items()},
    )


class CheckFailed(Exception):
    """A way could not run at all (the plugins do not load, a world cannot be created)."""


def _run(spec: WorldSpec, way: Way, ticks: int, dump_at: int = 0) -> WayResult:
    if not way.restart_at:
        return _child(spec, Run(way, ticks, dump_at))
    with tempfile.TemporaryDirectory(prefix="meshd-check-") as folder:
        first = _child(spec, Run(way, ticks, dump_at, folder))
        second = _child(spec, Run(way, ticks, dump_at, folder, resume=True))
    return WayResult(
        digests=first.digests + second.digests,
        findings=first.findings + second.findings,
        records=first.records if first.records is not None else second.records,
    )


def check(spec: WorldSpec, ticks: int = DEFAULT_TICKS, *, parallel: int = 0) -> CheckReport:
    """Run every way of :func:`ways`, compare them tick by tick, explain the first difference.

    ``parallel``: ways run at once (0: one per CPU). Raises :class:`CheckFailed`
    if a way cannot run at all.
    """
    plan = ways(ticks)
    with ThreadPoolExecutor(max_workers=parallel or os.cpu_count() or 1) as pool:
        results = list(pool.map(lambda way: _run(spec, way, ticks), plan))
    reference = results[0].digests
    first: dict[str, int | None] = {}
    for way, result in zip(plan, results, strict=True):
        first[way.name] = next(
            (
                tick
                for tick, (a, b) in enumerate(zip(reference, result.digests, strict=True), 1)
                if a != b
            ),
            None,
        )
    findings: dict[tuple[str, str], int] = {}
    for result in results:
        for what, where, count in result.findings:
            findings[(what, where)] = max(findings.get((what, where), 0), count)
    found = sorted(((w, p, c) for (w, p), c in findings.items()), key=lambda f: (-f[2], f[0]))
    differing = [(tick, way) for way in plan if (tick := first[way.name]) is not None]
    difference = None
    if differing:
        tick, way = min(differing, key=lambda pair: pair[0])
        with ThreadPoolExecutor(max_workers=2) as pool:
            ours, theirs = pool.map(lambda w: _run(spec, w, tick, dump_at=tick), (plan[0], way))
        assert ours.records is not None and theirs.records is not None
        difference = Difference(tick, way.name, compare(ours.records, theirs.records, spec, way))
    return CheckReport(
        spec, ticks, plan, first, difference, found, likely_causes(first, found, plan)
    )


def compare(
    ours: Mapping[int, Sequence[Any]],
    theirs: Mapping[int, Sequence[Any]],
    spec: WorldSpec,
    way: Way,
) -> list[dict[str, Any]]:
    """The entities that differ (lowest ids first, at most :data:`SHOWN_ENTITIES`)."""
    plugins = load_plugins(spec.plugins, [Path(d) for d in spec.dirs], spec.settings, CONVERTER)
    schema = plugins.schema()
    shown = []
    for entity_id in sorted(ours.keys() | theirs.keys()):
        a, b = ours.get(entity_id), theirs.get(entity_id)
        if a == b:
            continue
        if a is None or b is None:
            present = b if a is None else a
            shown.append(
                {
                    "id": entity_id,
                    "kind": present[1],
                    "only_in": way.name if a is None else "one worker",
                }
            )
        elif entity_id == 0:  # the plugins' world state
            fields = {
                f"{plugin}.{name}": [_plain(value), _plain(b[5].get(plugin, {}).get(name))]
                for plugin, values in a[5].items()
                for name, value in values.items()
                if b[5].get(plugin, {}).get(name) != value
            }
            shown.append({"id": 0, "kind": "world state", "fields": fields})
        else:
            fields = {}
            for name, left, right in zip(("kind", "x", "y", "z"), a[1:5], b[1:5], strict=True):
                if left != right:
                    fields[name] = [_plain(left), _plain(right)]
            names = schema.get(a[1], ())
            for name, left, right in zip(names, a[5], b[5], strict=True):
                if left != right:
                    fields[name] = [_plain(left), _plain(right)]
            shown.append({"id": entity_id, "kind": a[1], "fields": fields})
        if len(shown) == SHOWN_ENTITIES:
            break
    return shown


def _plain(value: Any) -> Any:
    """A state value as JSON holds it (bytes as hex)."""
    if isinstance(value, bytes):
        return value.hex()
    if isinstance(value, list | tuple):
        return [_plain(item) for item in value]
    if isinstance(value, dict):
        return {key: _plain(item) for key, item in value.items()}
    return value


def likely_causes(
    first: Mapping[str, int | None], found: Sequence[tuple[str, str, int]], plan: Sequence[Way]
) -> list[str]:
    """What most likely made the worlds differ, most specific first."""
    if all(tick is None for tick in first.values()):
        return []
    causes = [f"{what} at {where} ({count} calls)" for what, where, count in found]
    again, many = first[plan[1].name], [first[way.name] for way in plan[2:4]]
    restart = first[plan[4].name]
    if again is not None:
        causes.append(
            "the same run differs in another process: randomness or clocks outside ctx.rng, "
            "or the iteration order of a set (or a dict) built from strings or ids"
        )
    if again is None and any(tick is not None for tick in many):
        causes.append(
            "the layout changes the world: state shared between entities outside ctx (a "
            "module-level dict or list, a class attribute), reading entities other than through "
            "ctx.nearby and events, or the order of a set of ids"
        )
    if again is None and restart is not None:
        causes.append(
            "a restart changes the world: state kept outside the entities' state classes "
            "(module-level variables start empty after a restart)"
        )
    return causes


def format_report(report: CheckReport) -> list[str]:
    """The report as lines of text for a terminal."""
    spec = report.spec
    lines = [
        f"meshd check: {', '.join(spec.plugins)}, seed {spec.seed}, {report.ticks} ticks, "
        f"{len(report.ways)} ways"
    ]
    for index, way in enumerate(report.ways):
        tick = report.first_differing_tick[way.name]
        verdict = "reference" if index == 0 else "same" if tick is None else f"DIFFERS at {tick}"
        lines.append(f"  {way.name:<19} {verdict:<13} {way.description}")
    if report.difference is None:
        lines.append("OK: every way gives the same world after every tick")
        return lines
    difference = report.difference
    lines.append(
        f"FAIL: at tick {difference.tick} {difference.way!r} differs from {report.ways[0].name!r}:"
    )
    for entity in difference.entities:
        head = f"  entity {entity['id']} ({entity['kind']})"
        if "only_in" in entity:
            lines.append(f"{head}: exists only in {entity['only_in']!r}")
            continue
        changes = "; ".join(
            f"{name} {left!r} != {right!r}" for name, (left, right) in entity["fields"].items()
        )
        lines.append(f"{head}: {changes}")
    lines.append("Likely causes:")
    lines.extend(f"  - {cause}" for cause in report.causes)
    return lines


def _main() -> int:
    """The child: one run of a way, asked on stdin, answered as CBOR in the file named."""
    request = json.loads(sys.stdin.buffer.read())
    run = request["run"]
    result = run_way(WorldSpec(**request["spec"]), Run(**{**run, "way": Way(**run["way"])}))
    records = None
    if result.records is not None:
        records = {str(key): value for key, value in result.records.items()}
    answer = {
        "digests": result.digests,
        "findings": [list(finding) for finding in result.findings],
        "records": records,
    }
    Path(request["answer"]).write_bytes(cbor2.dumps(answer))
    return 0


if __name__ == "__main__":
    sys.exit(_main())
