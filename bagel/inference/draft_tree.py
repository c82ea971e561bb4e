"""Candidate trees for speculative decoding: a tree's buffers (`Tree`), Medusa's best static tree
from measured accuracies, and a dynamic tree from a drafter's scored candidates (EAGLE-2)."""

from __future__ import annotations

import heapq
from dataclasses import dataclass

import torch


@dataclass
class Tree:
    """A static candidate tree compiled into buffers. Node 0 is the root (the token to feed); a
    node's path (r_1, ..., r_d) means: rank r_1 of head 1, then rank r_2 of head 2, ...;
    nodes are sorted by (depth, path), so parents come before children."""

    paths: list[tuple[int, ...]]
    parent: list[int]  # parent[0] = -1
    depth: torch.Tensor  # (T,) long
    mask: torch.Tensor  # (T, T) bool: mask[i, j] = j is i or an ancestor of i
    children: list[list[int]]  # in rank order
    topk: list[int]  # candidates needed per depth (max rank + 1)

    @property
    def size(self) -> int:
        return len(self.paths)

    @property
    def max_depth(self) -> int:
        return len(self.topk)

    @classmethod
    def from_paths(cls, paths) -> "Tree":
        nodes = sorted({tuple(p) for p in paths} | {()}, key=lambda p: (len(p), p))
        index = {p: i for i, p in enumerate(nodes)}
        for p in nodes[1:]:
            if p[:-1] not in index:
                raise ValueError(f"tree path {list(p)} has no parent {list(p[:-1])}: every prefix must be listed")
            if min(p) < 0:
                raise ValueError(f"tree path {list(p)} has a negative rank")
        return cls.from_parents(nodes, [-1] + [index[p[:-1]] for p in nodes[1:]])

    @classmethod
    def from_parents(cls, paths: list[tuple[int, ...]], parent: list[int]) -> "Tree":
        """A tree whose nodes (parents first, node 0 the root) are already laid out: `from_paths`
        after its sorting and checks, and the dynamic trees of every decoding step."""
        T = len(paths)
        depth = torch.tensor([len(p) for p in paths])
        depth_max = int(depth.max())
        mask = torch.eye(T, dtype=torch.bool)
        par = torch.tensor(parent[1:], dtype=torch.long)
        for _ in range(depth_max):  # each pass adds one more generation of ancestors
            mask[1:] |= mask[par]
        children = [[] for _ in range(T)]
        for i in range(1, T):
            children[parent[i]].append(i)
        topk = [1 + max(p[d - 1] for p in paths if len(p) == d) for d in range(1, depth_max + 1)]
        return cls(paths, parent, depth, mask, children, topk)

    @classmethod
    def chain(cls, k: int) -> "Tree":
        return cls.from_paths([(0,) * d for d in range(1, k + 1)])

    @property
    def is_chain(self) -> bool:
        return all(r == 0 for p in self.paths for r in p)

    def path_to(self, node: int) -> list[int]:
        out = []
        while node >= 0:
            out.append(node)
            node = self.parent[node]
        return out[::-1]


def tree_from_accuracies(acc: torch.Tensor, budget: int) -> Tree:
    """Best static tree of `budget` drafted nodes from measured top-k accuracies.

    acc: (K, k) share of steps where rank r of head d is the LLM's token. A path's value is the
    product of its ranks' accuracies (independence assumed, as Medusa's tree search does); a
    child never beats its parent, so the `budget` best paths are closed under prefixes."""
    K, k = acc.shape
    heap, chosen = [(-float(acc[0, r]), (r,)) for r in range(k)], []
    heapq.heapify(heap)
    while heap and len(chosen) < budget:
        neg, path = heapq.heappop(heap)
        chosen.append(path)
        if len(path) < K:
            for r in range(k):
                heapq.heappush(heap, (neg * float(acc[len(path), r]), path + (r,)))
    return Tree.from_paths(chosen)


def tree_from_scores(tok: torch.Tensor, score: torch.Tensor, parent: torch.Tensor, K: int,
                     budget: int) -> tuple[Tree, list[int]]:
    """A dynamic tree from a drafter's candidate pool (token, summed log-probability, parent pool
    id or -1 per candidate): the `budget` best candidates as a Tree (nodes by depth, then pool order) and its node
    tokens. A child never outscores its parent and ties go to the shallower (the pool lists
    depths in order, so the earlier index), so the choice is closed under parents. A candidate's
    rank among its siblings is its pool index mod K (children are pooled K at a time, best first)."""
    n = score.shape[0]
    key = score.double() - 1e-9 * torch.arange(n, dtype=torch.float64, device=score.device) / n
    finite = int(torch.isfinite(key).sum())
    chosen = sorted(key.topk(max(1, min(budget, finite))).indices.tolist())
    tok, parent = tok.tolist(), parent.tolist()
    index = {p: i for i, p in enumerate(chosen, start=1)}  # pool id -> tree node (0: the root)
    parents = [-1] + [index.get(parent[p], 0) for p in chosen]
    paths = [()]
    for p, par in zip(chosen, parents[1:]):
        paths.append(paths[par] + (p % K,))
    return Tree.from_parents(paths, parents), [-1] + [tok[p] for p in chosen]
