"""The timing check every client test makes on a stream paced by the stand-in Poe server."""

from __future__ import annotations

import itertools

PACE_S = 0.5  # the stand-in's pause between the pieces of a paced answer
# A piece can reach the client late by the request's own start-up work (the first piece of a
# client's first stream, most of all): up to ~0.25 s was seen with 2 cores at load 9. Pieces
# held back until the end would arrive together, with gaps near 0.
SLACK_S = 0.3


def assert_arrived_as_sent(times: list[float]) -> None:
    """Each piece arrived about when Poe sent it: PACE_S after the one before, less SLACK_S."""
    assert len(times) >= 2, times
    gaps = [b - a for a, b in itertools.pairwise(times)]
    assert all(g >= PACE_S - SLACK_S for g in gaps), gaps
