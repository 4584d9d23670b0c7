"""Wu-Palmer similarity on WordNet's noun hierarchy, vectorized: one row block at a time, no pair loop.

    wup(a, b) = 2 · depth(lcs) / (depth(a) + depth(b))

depth(x) = number of synsets on the LONGEST path from the root `entity` to x (NLTK's `max_depth() + 1`),
lcs = the common hypernym (class and instance links, each synset its own hypernym) of greatest depth.
Where a and b each have a single root path (a tree), this is exactly NLTK's `wup_similarity`; with
multiple inheritance NLTK picks its subsumer by minimum depth and measures shortest paths to it,
which makes its score depend on tie-breaking by name, so we keep the textbook definition.

How it is computed without touching pairs in Python: unfold the DAG into the trie of all root paths
(every hypernym path of every class, shared prefixes merged). A class appears in the trie once per root
path ("occurrence"); occurrences are numbered in depth-first order, so every trie node covers an
interval of occurrence numbers. For class a, let U(a) be the trie nodes on a's root paths. The ones
covering occurrence p form a prefix of p's root path, so their count is the length of the longest
common prefix of p's path with a path of a — that is depth(lcs) for the pair. Counting intervals is
a difference array and a cumulative sum over a row block; the max over b's occurrences finishes it.
Cost per block of R rows: O(R · occurrences) memory and time, never C × C at once.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from megaclass.semantics.wordnet import synset_of


class WuPalmer:
    """Blockwise Wu-Palmer similarity among a fixed list of noun synsets.

    `block(rows) -> float32 [len(rows), C]` for a slice of class indices.
    """

    def __init__(self, wnids: Sequence[str]):
        trie: dict[tuple[int, ...], int] = {}  # root path prefix (synset offsets) -> trie node
        parent: list[int] = []
        node_sets: list[list[int]] = []  # U(a): trie nodes on a's root paths
        occurrences: list[tuple[int, int]] = []  # (trie node, class)
        depth = np.empty(len(wnids), dtype=np.float32)
        for cls, wnid in enumerate(wnids):
            paths = synset_of(wnid).hypernym_paths()
            depth[cls] = max(len(p) for p in paths)
            nodes = set()
            for path in paths:
                key: tuple[int, ...] = ()
                for synset in path:
                    up = trie.get(key, -1)
                    key = key + (synset.offset(),)
                    if key not in trie:
                        trie[key] = len(parent)
                        parent.append(up)
                    nodes.add(trie[key])
                occurrences.append((trie[key], cls))
            node_sets.append(sorted(nodes))

        start, end = _preorder_intervals(np.asarray(parent))
        occ_node, occ_class = np.asarray(occurrences).T
        by_preorder = np.argsort(start[occ_node], kind="stable")
        occ_node, occ_class = occ_node[by_preorder], occ_class[by_preorder]
        occ_start = start[occ_node]
        # Trie node t covers occurrence numbers [lo[t], hi[t]).
        lo = np.searchsorted(occ_start, start, side="left")
        hi = np.searchsorted(occ_start, end, side="left")

        sizes = np.array([len(s) for s in node_sets])
        self._row_ptr = np.concatenate([[0], np.cumsum(sizes)])
        flat = np.concatenate([np.asarray(s, dtype=np.int64) for s in node_sets])
        self._lo = torch.from_numpy(lo[flat].astype(np.int64))
        self._hi = torch.from_numpy(hi[flat].astype(np.int64))
        self.num_occurrences = len(occ_class)
        self.depth = torch.from_numpy(depth)
        # Occurrence columns per class: the first in one gather, the rest (multiple paths) in rounds.
        order = np.argsort(occ_class, kind="stable")
        counts = np.bincount(occ_class, minlength=len(wnids))
        first = np.concatenate([[0], np.cumsum(counts)[:-1]])
        self._rounds = []
        for r in range(int(counts.max())):
            classes = np.nonzero(counts > r)[0]
            self._rounds.append((torch.from_numpy(classes), torch.from_numpy(order[first[classes] + r])))

    def __len__(self) -> int:
        return len(self.depth)

    def lcs_depth(self, rows: slice) -> torch.Tensor:
        """depth(lcs(a, b)) for a in `rows`, every b: int32 [R, C]."""
        r0, r1, _ = rows.indices(len(self))
        rows_n, width = r1 - r0, self.num_occurrences + 1
        p0, p1 = self._row_ptr[r0], self._row_ptr[r1]
        row_of = torch.repeat_interleave(torch.arange(rows_n), torch.from_numpy(np.diff(self._row_ptr[r0:r1 + 1])))
        diff = torch.zeros(rows_n * width, dtype=torch.int32)
        ones = torch.ones(p1 - p0, dtype=torch.int32)
        diff.index_add_(0, row_of * width + self._lo[p0:p1], ones)
        diff.index_add_(0, row_of * width + self._hi[p0:p1], -ones)
        covering = diff.view(rows_n, width).cumsum(1, dtype=torch.int32)
        classes, columns = self._rounds[0]
        out = covering[:, columns]
        for classes, columns in self._rounds[1:]:
            out[:, classes] = torch.maximum(out[:, classes], covering[:, columns])
        return out

    def block(self, rows: slice) -> torch.Tensor:
        """wup(a, b) for a in `rows`, every b: float32 [R, C], 1 on the diagonal."""
        r0, r1, _ = rows.indices(len(self))
        return 2 * self.lcs_depth(rows).float() / (self.depth[r0:r1, None] + self.depth[None, :])


def _preorder_intervals(parent: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Depth-first numbering of a forest given parent links (-1 for roots): node t's subtree is
    exactly the nodes numbered [start[t], end[t])."""
    children: list[list[int]] = [[] for _ in parent]
    roots = []
    for node, up in enumerate(parent.tolist()):
        (children[up] if up >= 0 else roots).append(node)
    start = np.empty(len(parent), dtype=np.int64)
    end = np.empty(len(parent), dtype=np.int64)
    counter = 0
    stack = [(r, False) for r in reversed(roots)]
    while stack:
        node, done = stack.pop()
        if done:
            end[node] = counter
            continue
        start[node] = counter
        counter += 1
        stack.append((node, True))
        stack.extend((c, False) for c in reversed(children[node]))
    return start, end
