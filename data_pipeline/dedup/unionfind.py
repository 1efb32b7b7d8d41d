"""Union-find over arbitrary hashable nodes (path halving), used to turn duplicate pairs into clusters."""
from __future__ import annotations


class UnionFind:
    def __init__(self):
        self.parent: dict = {}

    def find(self, x):
        parent = self.parent
        if x not in parent:
            return x
        while parent.get(x, x) != x:
            parent[x] = parent.get(parent[x], parent[x])
            x = parent[x]
        return x

    def union(self, a, b) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            lo, hi = (ra, rb) if ra < rb else (rb, ra)  # deterministic root: the smaller node
            self.parent[hi] = lo
            self.parent.setdefault(lo, lo)

    def clusters(self) -> dict:
        """root -> sorted members, for every node that was ever unioned."""
        out: dict = {}
        for x in list(self.parent):
            out.setdefault(self.find(x), []).append(x)
        return {r: sorted(m) for r, m in out.items()}
