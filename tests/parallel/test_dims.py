"""The layout as a value: degrees, coordinates, group rank lists and checks, without a process
group (every torch.distributed entry point used by the package raises while these run)."""

from __future__ import annotations

import math

import pytest

from moe_train.parallel import ExpertShard, ParallelConfig, ParallelDims
from moe_train.routing import RouterConfig
from tests.helpers.distributed import forbid_torch_distributed


@pytest.fixture
def no_dist(monkeypatch):
    forbid_torch_distributed(monkeypatch)


@pytest.mark.parametrize(("world", "ep"), [(1, 1), (4, 2), (8, 4), (8, 8), (6, 1)])
def test_coordinates_cover_the_grid_once(no_dist, world, ep):
    seen = set()
    for rank in range(world):
        d = ParallelDims(world_size=world, ep=ep, rank=rank)
        assert d.dp == world // ep and d.dp * d.ep == world
        assert d.rank == d.dp_rank * ep + d.ep_rank
        assert d.expert_shard == ExpertShard(ep, d.ep_rank)
        assert rank in d.ep_groups()[d.dp_rank] and rank in d.dp_groups()[d.ep_rank]
        seen.add((d.dp_rank, d.ep_rank))
    assert len(seen) == world


@pytest.mark.parametrize(("world", "ep"), [(4, 2), (8, 4), (6, 3)])
def test_ep_and_dp_groups_partition_the_world(no_dist, world, ep):
    d = ParallelDims(world_size=world, ep=ep)
    for groups, size, count in ((d.ep_groups(), ep, world // ep), (d.dp_groups(), world // ep, ep)):
        assert len(groups) == count and all(len(g) == size for g in groups)
        assert sorted(r for g in groups for r in g) == list(range(world))
    # an ep group is `ep` consecutive ranks; a dp group holds the ranks with the same experts
    assert d.ep_groups()[1] == list(range(ep, 2 * ep))
    assert all(len({r % ep for r in g}) == 1 for g in d.dp_groups())


def test_node_groups_split_each_ep_group_into_whole_nodes(no_dist):
    d = ParallelDims(world_size=8, ep=4, rank=5, ranks_per_node=2, hierarchical_a2a=True)
    assert d.hierarchical
    intra, inter = d.node_groups()
    assert intra == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert inter == [[0, 2], [1, 3], [4, 6], [5, 7]]
    # not asked for, or the ep group fits inside one node: flat
    assert ParallelDims(8, 4, ranks_per_node=2).node_groups() == ([], [])
    flat = ParallelDims(8, 2, ranks_per_node=4, hierarchical_a2a=True)
    assert not flat.hierarchical and flat.node_groups() == ([], [])


def test_from_config_resolves_ranks_per_node(no_dist):
    cfg = ParallelConfig(ep=2)
    assert ParallelDims.from_config(cfg, 4, 3).node_size == 4  # one node
    assert ParallelDims.from_config(cfg, 4, 3, local_world_size=2).node_size == 2  # torchrun's
    pinned = ParallelConfig(ep=2, ranks_per_node=1, hierarchical_a2a=True)
    d = ParallelDims.from_config(pinned, 4, 3, local_world_size=2)
    assert (d.node_size, d.hierarchical, d.ep_rank, d.dp_rank) == (1, True, 1, 1)


@pytest.mark.parametrize(
    ("kwargs", "words"),
    [
        (dict(world_size=6, ep=4), ["parallel.ep=4", "world size 6"]),
        (dict(world_size=4, ep=2, rank=4), ["rank=4"]),
        (dict(world_size=4, ep=0), ["parallel.ep"]),
        (dict(world_size=4, ep=2, ranks_per_node=0), ["parallel.ranks_per_node"]),
    ],
)
def test_bad_layouts_raise_naming_the_field(no_dist, kwargs, words):
    with pytest.raises(ValueError) as err:
        ParallelDims(**kwargs)
    for w in words:
        assert w in str(err.value)


def test_expert_shard_places_consecutive_experts(no_dist):
    assert [ExpertShard(4, r).first_expert(16) for r in range(4)] == [0, 4, 8, 12]
    assert ExpertShard(4, 3).num_local(16) == 4 and ExpertShard().num_local(7) == 7
    with pytest.raises(ValueError, match="model.num_experts=6 is not divisible by parallel.ep=4"):
        ExpertShard(4, 0).num_local(6)
    with pytest.raises(ValueError, match="ep_rank=2"):
        ExpertShard(2, 2)


@pytest.mark.parametrize(
    ("cfg", "field"),
    [
        (ParallelConfig(timeout_s=math.inf), "parallel.timeout_s"),
        (ParallelConfig(timeout_s=math.nan), "parallel.timeout_s"),
        (ParallelConfig(ranks_per_node=0), "parallel.ranks_per_node"),
        (ParallelConfig(ep=0), "parallel.ep"),
    ],
)
def test_config_values_are_checked_by_name(no_dist, cfg, field):
    with pytest.raises(ValueError, match=field):
        cfg.validate(4, 8, RouterConfig())
