"""A small thread-safe LRU cache shared by the loaders and the federation builder.

Every simulated hospital process asks for the same source and the same
federation once; building them once per process is what keeps that cheap.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

V = TypeVar("V")

_ALL: list[LruCache] = []


class LruCache(Generic[V]):
    """Keep the ``maxsize`` most recently used values, keyed by hashable tuples.

    Parameters
    ----------
    maxsize : int
        How many values to keep.
    """

    def __init__(self, maxsize: int) -> None:
        self._maxsize = maxsize
        self._items: OrderedDict[Hashable, V] = OrderedDict()
        self._lock = threading.RLock()
        _ALL.append(self)

    def get_or_build(self, key: Hashable, build: Callable[[], V]) -> V:
        """Return the cached value for ``key``, building and storing it on a miss.

        Parameters
        ----------
        key : Hashable
            The cache key.
        build : Callable[[], V]
            Makes the value; errors propagate and nothing is stored.

        Returns
        -------
        V
            The value.
        """
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
                return self._items[key]
            # Built under the lock so concurrent callers in threads share one build.
            value = build()
            self._items[key] = value
            while len(self._items) > self._maxsize:
                self._items.popitem(last=False)
            return value

    def discard_if(self, predicate: Callable[[Hashable], bool]) -> None:
        """Drop every entry whose key satisfies ``predicate``.

        Parameters
        ----------
        predicate : Callable[[Hashable], bool]
            Called with each key.
        """
        with self._lock:
            for key in [k for k in self._items if predicate(k)]:
                del self._items[key]

    def clear(self) -> None:
        """Drop every entry."""
        with self._lock:
            self._items.clear()


def clear_caches() -> None:
    """Forget every cached source and federation in this process."""
    for cache in _ALL:
        cache.clear()
