"""Disco's word count with ``Cluster.map_reduce(..., by_key=True)``.

Disco's mapper yields ``(word, 1)`` for every word of a line and its reducer sums the
counts of each word. Here the same mapper runs on the servers, each server sums the
counts of its share of the lines, and only those partial counts travel back to be merged.
The text, Lincoln's Gettysburg Address (public domain), ships with the example. The
counts are printed sorted alphabetically, then by count.

Run it on two local servers, or on servers already running (``rpycsvc serve``)::

    python examples/disco_wordcount.py
    python examples/disco_wordcount.py host1:18812 host2:18812
"""

from __future__ import annotations

import operator
import re
import sys
from collections.abc import Iterator

import rpycsvc

TEXT = """\
Four score and seven years ago our fathers brought forth on this continent, a new nation,
conceived in Liberty, and dedicated to the proposition that all men are created equal.
Now we are engaged in a great civil war, testing whether that nation, or any nation so
conceived and so dedicated, can long endure. We are met on a great battle-field of that
war. We have come to dedicate a portion of that field, as a final resting place for those
who here gave their lives that that nation might live. It is altogether fitting and
proper that we should do this.
But, in a larger sense, we can not dedicate -- we can not consecrate -- we can not
hallow -- this ground. The brave men, living and dead, who struggled here, have
consecrated it, far above our poor power to add or detract. The world will little note,
nor long remember what we say here, but it can never forget what they did here. It is for
us the living, rather, to be dedicated here to the unfinished work which they who fought
here have thus far so nobly advanced. It is rather for us to be here dedicated to the
great task remaining before us -- that from these honored dead we take increased devotion
to that cause for which they gave the last full measure of devotion -- that we here
highly resolve that these dead shall not have died in vain -- that this nation, under
God, shall have a new birth of freedom -- and that government of the people, by the
people, for the people, shall not perish from the earth.
"""


def words(line: str) -> Iterator[tuple[str, int]]:
    """Disco's map: ``(word, 1)`` for every word of the line (runs on a server)."""
    for word in re.findall(r"[a-z]+", line.lower()):
        yield word, 1


def main(argv: list[str]) -> int:
    lines = TEXT.splitlines()
    cluster = rpycsvc.Cluster(argv) if argv else rpycsvc.Cluster.local(2)
    with cluster:
        # chunksize=4: a few lines per task, so every server gets a share of this short text
        counts = cluster.map_reduce(words, operator.add, lines, by_key=True, chunksize=4,
                                    timeout=60)
        print(f"{sum(counts.values())} words, {len(counts)} distinct, in {len(lines)} lines "
              f"counted on {len(cluster)} servers")
    print("== sorted alphabetically ==")
    for word, count in sorted(counts.items()):
        print(f"{word} {count}")
    print("== sorted by count ==")
    for word, count in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])):
        print(f"{word} {count}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
