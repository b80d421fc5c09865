"""Hand-made histories for bench/history.py's checker: each rule has histories that must pass
and histories that must fail.

    python3 -m unittest discover -s bench -p test_history.py
"""

from __future__ import annotations

import itertools
import unittest

from history import Op, check

_ids = itertools.count()


def put(value, invoke, complete, status=204, tier="redis", key="u/k"):
    return Op(next(_ids), "put", key, invoke, complete, status, tier, value, "t")


def delete(invoke, complete, status=204, tier="redis", key="u/k"):
    return Op(next(_ids), "delete", key, invoke, complete, status, tier, None, "t")


def get(value, invoke, complete, tier="redis", status=None, key="u/k", final=False):
    status = status if status is not None else (200 if value is not None else 404)
    return Op(next(_ids), "get", key, invoke, complete, status, tier, value, "t", final)


def final(value, t=100.0, key="u/k"):
    """A final read: served by Redis, so R holds it as well as F."""
    return get(value, t, t + 0.01, key=key, final=True)


def rules(history):
    return sorted(a.rule for a in check(history))


class Validity(unittest.TestCase):
    def test_values_written_pass(self):
        self.assertEqual(rules([put("a", 0, 1), get("a", 2, 3), get("a", 0.5, 0.6, tier="memory")]), [])

    def test_a_read_concurrent_with_its_put_passes(self):
        self.assertEqual(rules([put("a", 1, 5), get("a", 0, 2)]), [])

    def test_a_value_never_written_fails(self):
        self.assertEqual(rules([put("a", 0, 1), get("zz", 2, 3, tier="memory")]), ["V"])

    def test_another_keys_value_fails(self):
        found = check([put("a", 0, 1, key="u/j"), get("a", 2, 3, key="u/k")])
        self.assertEqual([a.rule for a in found], ["V"])
        self.assertIn("u/j", found[0].message)

    def test_a_refused_puts_value_fails(self):
        self.assertEqual(rules([put("a", 0, 1, status=507, tier="memory"), get("a", 2, 3)]), ["V"])

    def test_a_value_read_before_its_put_fails(self):
        self.assertEqual(rules([put("a", 5, 6), get("a", 1, 2, tier="memory")]), ["V"])


class Final(unittest.TestCase):
    def test_the_last_acknowledged_put_passes(self):
        self.assertEqual(rules([put("a", 0, 1), put("b", 2, 3), final("b")]), [])

    def test_concurrent_puts_either_passes(self):
        for winner in "ab":
            self.assertEqual(rules([put("a", 0, 3), put("b", 1, 2), final(winner)]), [])

    def test_an_indeterminate_put_may_land_last(self):
        self.assertEqual(rules([put("a", 0, 1, status=None), put("b", 2, 3), final("a")]), [])
        self.assertEqual(rules([put("a", 0, 1, status=502), delete(2, 3), final("a")]), [])

    def test_a_refused_put_is_not_a_final_value(self):
        self.assertEqual(rules([put("a", 0, 1), put("b", 2, 3, status=503), final("a")]), [])

    def test_an_older_acknowledged_put_replayed_over_a_newer_fails(self):
        # The reproduction: v1 held by A (memory), v2 through B (redis), v1 replayed.
        history = [put("v1", 0, 1, tier="memory"), put("v2", 2, 3), final("v1")]
        self.assertEqual(rules(history), ["F", "R"])

    def test_a_put_overtaken_by_a_delete_fails(self):
        self.assertEqual(rules([put("a", 0, 1), delete(2, 3, tier="memory"), final("a")]), ["F"])

    def test_final_reads_that_disagree_fail(self):
        found = rules([put("a", 0, 3), put("b", 1, 2), final("a"), final("b")])
        self.assertEqual(found, ["F"])

    def test_absent_after_a_last_delete_passes(self):
        self.assertEqual(rules([put("a", 0, 1), delete(2, 3, tier="memory"), final(None)]), [])
        self.assertEqual(rules([put("a", 0, 1, status=None), final(None)]), [])
        self.assertEqual(rules([put("a", 0, 1, status=503), final(None)]), [])
        self.assertEqual(rules([put("a", 2, 3), delete(0, 1, status=None), final(None)]), [])

    def test_absent_with_a_delete_undone_by_a_replay_fails(self):
        # The second key: DELETE held by A, PUT through B, the DELETE replayed.
        history = [delete(0, 1, tier="memory"), put("w", 2, 3), final(None)]
        self.assertEqual(rules(history), ["F", "R"])

    def test_final_reads_from_memory_are_not_judged(self):
        stale = get("a", 100, 100.01, tier="memory", final=True)
        self.assertEqual(rules([put("a", 0, 1), put("b", 2, 3), final("b"), stale]), [])

    def test_absent_with_no_delete_fails(self):
        self.assertEqual(rules([put("a", 0, 1, tier="memory"), final(None)]), ["F"])


class RedisReads(unittest.TestCase):
    def test_the_latest_value_passes(self):
        self.assertEqual(rules([put("a", 0, 1), put("b", 2, 3), get("b", 4, 5)]), [])

    def test_a_read_concurrent_with_the_newer_write_passes(self):
        self.assertEqual(rules([put("a", 0, 1), put("b", 2, 5), get("a", 3, 4)]), [])
        self.assertEqual(rules([put("a", 0, 1), put("b", 2, 4), get("a", 3.5, 6)]), [])

    def test_a_value_overtaken_by_a_memory_write_passes(self):
        # A write held in memory may reach Redis later: not yet visible there is allowed.
        self.assertEqual(rules([put("a", 0, 1), put("b", 2, 3, tier="memory"), get("a", 4, 5)]), [])

    def test_stale_reads_from_memory_pass(self):
        self.assertEqual(rules([put("a", 0, 1), put("b", 2, 3), get("a", 4, 5, tier="memory"),
                                delete(6, 7), get("b", 8, 9, tier="memory")]), [])

    def test_an_indeterminate_write_may_appear_any_time(self):
        self.assertEqual(rules([put("a", 0, 1, status=None), put("b", 2, 3), get("a", 4, 5)]), [])

    def test_a_value_overtaken_by_a_redis_put_fails(self):
        history = [put("v1", 0, 1, tier="memory"), put("v2", 2, 3), get("v1", 4, 5)]
        self.assertEqual(rules(history), ["R"])

    def test_a_value_overtaken_by_a_redis_delete_fails(self):
        self.assertEqual(rules([put("a", 0, 1), delete(2, 3), get("a", 4, 5)]), ["R"])

    def test_absent_after_a_delete_passes(self):
        self.assertEqual(rules([put("a", 0, 1), delete(2, 3, tier="memory"), get(None, 4, 5)]), [])
        self.assertEqual(rules([put("a", 0, 1), delete(2, 3, status=None), get(None, 4, 5)]), [])

    def test_absent_before_any_redis_put_passes(self):
        self.assertEqual(rules([put("a", 0, 1, tier="memory"), get(None, 2, 3)]), [])
        self.assertEqual(rules([put("a", 2, 4), get(None, 3, 5)]), [])

    def test_a_delete_after_the_read_does_not_excuse_absent(self):
        self.assertEqual(rules([put("a", 0, 1), get(None, 2, 3), delete(4, 5)]), ["R"])

    def test_absent_after_a_redis_put_that_followed_every_delete_fails(self):
        history = [delete(0, 1, tier="memory"), put("w", 2, 3), get(None, 4, 5)]
        self.assertEqual(rules(history), ["R"])

    def test_failed_reads_are_not_reads(self):
        self.assertEqual(rules([put("a", 0, 1), get(None, 2, 3, status=503)]), [])


if __name__ == "__main__":
    unittest.main()
