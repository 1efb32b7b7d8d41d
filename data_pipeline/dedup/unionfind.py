"""Connected components of duplicate edges (the union-find of MinHash dedup), vectorised: scipy's
connected_components over the nodes that have an edge, each component labelled by its smallest node (the
first document in input order: the survivor, independent of task counts)."""
from __future__ import annotations

import numpy as np
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components


def components(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Edges a[i]-b[i] (uint64 node ids) -> (nodes sorted, label per node, smallest node of each label)."""
    nodes = np.unique(np.concatenate([a, b]).astype(np.uint64))
    if len(nodes) == 0:
        return nodes, np.zeros(0, np.int64), np.zeros(0, np.uint64)
    ia, ib = np.searchsorted(nodes, a), np.searchsorted(nodes, b)
    graph = coo_matrix((np.ones(len(ia), np.int8), (ia, ib)), shape=(len(nodes), len(nodes))).tocsr()
    n, labels = connected_components(graph, directed=False)
    first = np.full(n, len(nodes), np.int64)
    np.minimum.at(first, labels, np.arange(len(nodes)))  # nodes are sorted: smallest index = smallest node
    return nodes, labels, nodes[first]


def forest(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The same components as edges ``(node, root)`` for every node that is not its component's root: at most
    one edge per node, whatever the number of input edges (what a partition hands to the merge)."""
    nodes, labels, roots = components(a, b)
    root = roots[labels]
    keep = nodes != root
    return nodes[keep], root[keep]
