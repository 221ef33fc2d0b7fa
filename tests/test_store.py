"""FeatureCache.ensure, the store's one call for growing an entry, driven by a fake compute (no model, no images):
it computes only the rows an entry lacks, keeps old rows bit for bit, leaves the old entry and its finished shards
when a compute fails, asks again when rows turn out unreadable, and lets one process per key compute."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from lowshot.data.subsets import Listing
from lowshot.features.store import FeatureCache, Work

DIM = 4
LISTING = Listing([f"c{i % 2}/{i:02d}.jpg" for i in range(20)], np.arange(20) % 2, ["c0", "c1"])
KEY = "k" * 32


class Fake:
    """A compute whose feature row i is (i, call number, 0, 1): a row computed twice would show another call."""

    def __init__(self, *, call: int = 1, fail_after: int | None = None, unreadable: set[int] = frozenset(),
                 started: threading.Event | None = None, release: threading.Event | None = None):
        self.call, self.fail_after, self.unreadable = call, fail_after, set(unreadable)
        self.started, self.release = started, release
        self.rows: list[int] = []  # every row handed to this compute
        self.works: list[Work] = []

    @property
    def dim(self) -> int:
        return DIM

    def __call__(self, work: Work) -> int:
        self.works.append(work)
        if self.started is not None:
            self.started.set()
            assert self.release.wait(30)
        computed = 0
        for n, shard in enumerate(work.shards):
            if self.fail_after is not None and n == self.fail_after:
                raise RuntimeError("compute failed mid-way")
            self.rows.extend(shard.tolist())
            features = np.zeros((len(shard), DIM), dtype=np.float32)
            features[:, 0], features[:, 1], features[:, 3] = shard, self.call, 1
            failed = {int(i): "unreadable" for i in shard if int(i) in self.unreadable}
            work.write(shard, features, failed)
            computed += len(shard) - len(failed)
        return computed


def rows(*indices: int):
    return lambda listing: np.asarray(indices, dtype=np.int64)


def ensure(cache: FeatureCache, need, compute: Fake, **kw):
    return cache.ensure(KEY, need, listing=LISTING, compute=compute, manifest=lambda: {"classes": ["c0", "c1"]},
                        shard_size=kw.pop("shard_size", 3), **kw)


@pytest.fixture
def cache(tmp_path) -> FeatureCache:
    cache = FeatureCache(tmp_path / "cache")
    cache.ensure_writable()
    return cache


def test_ensure_on_an_empty_entry_computes_every_needed_row_in_listing_order(cache):
    compute = Fake()
    done = ensure(cache, rows(9, 2, 5, 14), compute)
    assert sorted(compute.rows) == [2, 5, 9, 14] and (done.computed, done.needed, done.grown) == (4, 4, True)
    assert done.features.rows.tolist() == [2, 5, 9, 14]
    assert np.asarray(done.features.features)[:, 0].tolist() == [2, 5, 9, 14]
    assert done.features.ids == [LISTING.ids[i] for i in (2, 5, 9, 14)]
    assert done.features.labels.tolist() == [0, 1, 1, 0]
    assert len(compute.works[0].shards) == 2  # 4 rows in shards of 3
    assert not cache.partial_dir(KEY).exists() and cache.verify() == []


def test_all_rows_when_need_is_none_and_a_covered_request_computes_nothing(cache):
    everything = ensure(cache, lambda listing: None, Fake())
    assert everything.features.complete and len(everything.features) == 20
    again = Fake(call=2)
    hit = ensure(cache, rows(3, 4), again)
    assert not again.works and (hit.grown, hit.computed, hit.needed) == (False, 0, 2)


def test_a_superset_computes_only_the_missing_rows_and_keeps_old_rows_bit_identical(cache):
    first = ensure(cache, rows(1, 4, 7), Fake(call=1))
    old = np.asarray(first.features.features).copy()
    created = first.features.manifest["created"]
    second = Fake(call=2)
    grown = ensure(cache, rows(0, 1, 4, 7, 12), second)
    assert sorted(second.rows) == [0, 12] and grown.computed == 2
    features = grown.features
    assert features.rows.tolist() == [0, 1, 4, 7, 12]
    np.testing.assert_array_equal(np.asarray(features.features)[[1, 2, 3]], old)  # call 1's rows, untouched
    assert np.asarray(features.features)[[0, 4], 1].tolist() == [2, 2]
    assert features.manifest["created"] == created and [h["added"] for h in features.manifest["history"]] == [3, 2]


def test_a_failing_compute_leaves_the_old_entry_and_its_finished_shards_resume(cache):
    first = ensure(cache, rows(1, 2), Fake(call=1))
    before = cache.entry_dir(KEY) / "features.npy"
    before_bytes = before.read_bytes()
    with pytest.raises(RuntimeError, match="mid-way"):
        ensure(cache, lambda listing: None, Fake(call=2, fail_after=2))  # 18 missing: shards 0 and 1 are written
    still = cache.load(KEY)
    assert still.rows.tolist() == first.features.rows.tolist() and before.read_bytes() == before_bytes
    assert cache.kept(KEY, lambda listing: None, listing=LISTING) == (2 + 6, 20)
    resumed = Fake(call=3)
    done = ensure(cache, lambda listing: None, resumed)
    assert len(resumed.rows) == 12 and resumed.works[0].done == 6 and resumed.works[0].total == 18
    assert not set(resumed.rows) & {1, 2} and done.computed == 12 and done.features.complete
    calls = np.asarray(done.features.features)[:, 1]
    assert sorted(set(calls.tolist())) == [1, 2, 3] and int((calls == 2).sum()) == 6  # the failed run's shards kept


def test_rows_found_unreadable_make_need_reach_further_in_a_second_round(cache):
    def first_readable(listing):
        return np.asarray([next(i for i in range(len(listing)) if i not in listing.unreadable)])

    compute = Fake(unreadable={0, 1})
    done = ensure(cache, first_readable, compute)
    assert [w.shards[0].tolist() for w in compute.works] == [[0], [1], [2]]
    assert done.features.rows.tolist() == [2] and done.computed == 1 and done.needed == 1
    assert set(done.features.manifest["skipped"]) == {LISTING.ids[0], LISTING.ids[1]}
    again = Fake(call=2)
    assert ensure(cache, first_readable, again).grown is False and not again.works  # the unreadable are remembered


def test_a_second_ensure_of_the_same_key_waits_for_the_first_then_reuses_its_rows(cache):
    started, release = threading.Event(), threading.Event()
    first = Fake(started=started, release=release)
    results = {}
    one = threading.Thread(target=lambda: results.update(one=ensure(cache, rows(1, 2, 3), first)), daemon=True)
    one.start()
    assert started.wait(30)
    second = Fake(call=2)
    two = threading.Thread(target=lambda: results.update(two=ensure(cache, rows(2, 3), second)), daemon=True)
    two.start()
    time.sleep(0.5)
    assert two.is_alive() and "two" not in results, "the second ensure must wait on the key's lock"
    release.set()
    one.join(30)
    two.join(30)
    assert not second.works and results["two"].grown is False and results["one"].grown is True
    np.testing.assert_array_equal(np.asarray(results["two"].features.features)[:, 1], [1, 1, 1])
