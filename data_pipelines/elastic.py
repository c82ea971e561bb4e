"""Elastic resume: the data state of R x W slots redistributed over R' x W' slots.

A slot's saved state says, per source, how far it got: the epoch, the shard cursor and the
offset inside the current shard, plus the samples it had read but not yet handed on (its
shuffle buffer, and the packer's overflow buffer at the mixer level). A sample is *consumed*
when a pack holding it was consumed, so everything else is still owed, exactly once:

* **Unread shard pieces.** For every epoch from the oldest epoch any slot is in to the newest,
  each old slot owes: nothing for epochs it has finished; the rest of its shard list (the shard
  under the cursor from its offset on) for the epoch it is in; its whole list for later epochs it
  has not reached. These pieces, in a fixed order (epoch, old slot, cursor), are dealt round-robin
  to the new slots as their explicit per-epoch `plan`.
* **Read but unconsumed samples** (both buffers) are dealt round-robin into the new slots'
  shuffle buffers, as references (re-read on restore, like any resume).
* Epochs after the newest planned one use the default layout for the new slot count.

Resampled sources owe nothing (they have no epoch); their new slots start fresh draws after the
largest draw seen. Mixer RNGs restart from seeds that include the resume point, so the pack
stream after a given elastic resume is deterministic. Skip counts are carried over (summed into
the first new slot).
"""

from __future__ import annotations

from typing import Any

from data_pipelines.shards import epoch_shards, stable_seed


def _fresh_stream() -> dict[str, Any]:
    return {"epoch": 0, "cursor": 0, "offset": 0, "exhausted": False, "failed_shards": 0,
            "buffer": [], "rng": None, "plan": {}}


def _items(state: dict[str, Any], epoch: int, *, seed: int, name: str, num_shards: int, slot: int,
           num_slots: int) -> list[tuple[int, int]]:
    plan = {int(e): v for e, v in state.get("plan", {}).items()}
    if epoch in plan:
        return [tuple(i) for i in plan[epoch]]
    return [(s, 0) for s in epoch_shards(seed, name, epoch, num_shards, slot, num_slots)]


def owed_pieces(old: dict[int, dict[str, Any] | None], old_num_slots: int, *, seed: int, name: str,
                num_shards: int, epochs: int | None) -> dict[int, list[tuple[int, int]]]:
    """{epoch: [(shard, first sample), ...]} not yet read by the old slots (an epoch-mode source)."""
    states = {slot: (st if st is not None else _fresh_stream()) for slot, st in old.items()}
    live = {slot: st for slot, st in states.items() if not st["exhausted"]}
    if not live:
        return {}
    first = min(st["epoch"] for st in live.values())
    # a slot that finished (or ran ahead) still means the others owe their lists up to its epoch
    last = max([st["epoch"] for st in states.values()]
               + [int(e) for st in states.values() for e in st.get("plan", {})])
    if epochs is not None:
        last = min(last, epochs - 1)
    owed: dict[int, list[tuple[int, int]]] = {}
    for epoch in range(first, last + 1):
        pieces = []
        for slot in sorted(live):
            st = live[slot]
            if epoch < st["epoch"]:
                continue
            items = _items(st, epoch, seed=seed, name=name, num_shards=num_shards, slot=slot,
                           num_slots=old_num_slots)
            if epoch == st["epoch"]:
                items = items[st["cursor"]:]
                if items:
                    items[0] = (items[0][0], max(items[0][1], st["offset"]))
            pieces.extend(items)
        owed[epoch] = pieces
    return owed


def reshard_stream(old: dict[int, dict[str, Any] | None], old_num_slots: int, new_slots: list[int],
                   new_num_slots: int, *, seed: int, name: str, num_shards: int, resampled: bool,
                   epochs: int | None, extra_refs: list[tuple] = ()) -> dict[int, dict[str, Any]]:
    """New ShardStream states for `new_slots` (of `new_num_slots`), among which everything `old`
    owed is dealt: together they owe exactly what `old` owed.

    `old` maps old slot index -> its stream state (None: never started); `extra_refs` are
    read-but-unconsumed samples held elsewhere (the packer's buffer). RNG states are left None
    (the stream seeds its own)."""
    refs = [tuple(r) for slot in sorted(old) if old[slot] is not None for r in old[slot]["buffer"]]
    refs += [tuple(r) for r in extra_refs]
    out = {}
    if resampled:
        draws = [st["epoch"] for st in old.values() if st is not None]
        start = max(draws, default=-1) + 1
        for j, slot in enumerate(new_slots):
            out[slot] = {**_fresh_stream(), "epoch": start, "buffer": refs[j::len(new_slots)]}
        return out
    owed = owed_pieces(old, old_num_slots, seed=seed, name=name, num_shards=num_shards, epochs=epochs)
    done = [st["epoch"] for st in old.values() if st is not None]
    first = min(owed, default=max(done, default=0))
    for j, slot in enumerate(new_slots):
        plan = {e: [list(p) for p in pieces[j::len(new_slots)]] for e, pieces in owed.items()}
        out[slot] = {**_fresh_stream(), "epoch": first, "plan": plan, "buffer": refs[j::len(new_slots)],
                     "exhausted": epochs is not None and first >= epochs and not refs[j::len(new_slots)]}
    return out


def reshard_slots(old: dict[int, dict[str, Any] | None], old_num_slots: int, new_slots: list[int],
                  new_num_slots: int, *, config, manifests) -> dict[int, dict[str, Any]]:
    """New `SlotPipeline` states (mixer + packer + pack index) for `new_slots`.

    `old` maps old slot index -> its pipeline state (None: it never produced a pack)."""
    started = {slot: st for slot, st in old.items() if st is not None}
    packer_refs = [tuple(r) for slot in sorted(started) for r in started[slot]["packer"]["buffer"]]
    index = max([st["index"] for st in started.values()], default=0)
    streams: dict[str, dict[int, dict[str, Any]]] = {}
    for source in config.sources:
        per_slot = {slot: (st["mixer"]["streams"][source.name] if st is not None else None)
                    for slot, st in old.items()}
        streams[source.name] = reshard_stream(
            per_slot, old_num_slots, new_slots, new_num_slots, seed=config.seed, name=source.name,
            num_shards=len(manifests[source.name].shards), resampled=source.resampled,
            epochs=source.epochs, extra_refs=[r for r in packer_refs if r[0] == source.name])
    stats: dict[str, int] = {}
    for st in started.values():
        for reason, n in st["stats"].items():
            stats[reason] = stats.get(reason, 0) + n
    out = {}
    for j, slot in enumerate(new_slots):
        mixer_seed = stable_seed(config.seed, "mix", slot, "elastic", index, old_num_slots, new_num_slots)
        out[slot] = {"mixer": {"rng": None, "seed": mixer_seed, "active": [True] * len(config.sources),
                               "streams": {name: s[slot] for name, s in streams.items()}},
                     "packer": {"buffer": [], "stream_done": False},
                     "index": index + 1, "stats": stats if j == 0 else {}}
    return out
