"""The aggregation rules, the reply bound, the hard cap on ledger updates (exact values on small inputs),
and the rows the server fixes: a node that sends more rows is rejected, not up-weighted."""

import math

import pytest
import torch

from hosfl_flower.node.client import HOSFLClient
from hosfl_flower.protocols.aggregation import Aggregator, ReplyBound, combine_rows, state_distance, weighted_average
from hosfl_flower.reference import run_reference
from hosfl_flower.zo import LedgerEntry, cap_entry, estimate_norm

ROWS = torch.tensor([[1.0, 10.0], [2.0, -5.0], [100.0, 0.0]], dtype=torch.float64)


@pytest.mark.parametrize(
    ("rule", "expected"),
    [
        ("mean", [(1 * 1 + 2 * 1 + 100 * 2) / 4, (10 - 5 + 0) / 4]),
        ("median", [2.0, 0.0]),
        ("trimmed-mean", [2.0, 0.0]),  # 3 replies, β = 0.2: one dropped at each end
    ],
)
def test_coordinate_wise_rules(rule, expected):
    combined = combine_rows(rule, ROWS, [1.0, 1.0, 2.0], trim_fraction=0.2, clip_factor=2.0)
    assert combined.tolist() == pytest.approx(expected)


def test_median_of_an_even_count_is_the_mean_of_the_middle_two():
    rows = torch.tensor([[1.0], [2.0], [4.0], [100.0]], dtype=torch.float64)
    assert combine_rows("median", rows, [1, 1, 1, 1], 0.2, 2.0).item() == 3.0
    assert combine_rows("trimmed-mean", rows, [1, 1, 1, 1], 0.25, 2.0).item() == 3.0
    assert combine_rows("trimmed-mean", rows, [1, 1, 1, 1], 0.0, 2.0).item() == pytest.approx(107 / 4)


def test_clipped_mean_clips_each_coordinate_to_a_multiple_of_its_median_absolute_deviation():
    rows = torch.tensor([[1.0, 10.0], [1.5, 11.0], [3.0, 14.0], [1e11, -1e11]], dtype=torch.float64)
    # column 0: median 2.25, absolute deviations 1.25, 0.75, 0.75, ~1e11 -> MAD 1.0, values clipped to [0.25, 4.25]
    # column 1: median 10.5, deviations 0.5, 0.5, 3.5, ~1e11 -> MAD 2.0, values clipped to [6.5, 14.5]
    combined = combine_rows("clipped-mean", rows, [1, 1, 1, 1], 0.2, 2.0)
    assert combined.tolist() == pytest.approx([(1.0 + 1.5 + 3.0 + 4.25) / 4, (10.0 + 11.0 + 14.0 + 6.5) / 4])
    assert float(combine_rows("mean", rows, [1, 1, 1, 1], 0.2, 2.0).abs().max()) > 1e10


def test_weights_cannot_buy_influence_under_the_robust_rules():
    heavy = [1.0, 1.0, 1e9]
    assert combine_rows("median", ROWS, heavy, 0.2, 2.0).tolist() == [2.0, 0.0]
    assert combine_rows("mean", ROWS, heavy, 0.2, 2.0)[0] > 99


def test_state_rules_treat_a_state_as_one_vector_and_keep_integer_tensors():
    states = [
        {"w": torch.tensor([1.0, 2.0]), "b": torch.tensor([0.0]), "n": torch.tensor(3)},
        {"w": torch.tensor([3.0, 2.5]), "b": torch.tensor([1.0]), "n": torch.tensor(4)},
        {"w": torch.tensor([-1e11, 1e11]), "b": torch.tensor([1e11]), "n": torch.tensor(5)},
    ]
    median = Aggregator("median").states(states, [1, 1, 1])
    assert median["w"].tolist() == [1.0, 2.5] and median["b"].tolist() == [1.0] and median["n"].item() == 3
    assert median["w"].dtype == torch.float32 and list(median) == ["w", "b", "n"]
    mean = Aggregator("mean").states(states[:2], [1, 3])
    assert all(torch.equal(mean[k], weighted_average(states[:2], [1, 3])[k]) for k in mean)


def test_aggregator_scalars_and_bad_input():
    assert Aggregator("median").scalars([[1.0, -1.0], [3.0, -3.0], [1e11, 1e11]], [1, 1, 1]) == (3.0, -1.0)
    with pytest.raises(ValueError, match="one length"):
        Aggregator("median").scalars([[1.0], [1.0, 2.0]], [1, 1])
    with pytest.raises(ValueError, match="unknown aggregation"):
        Aggregator("mode")
    with pytest.raises(ValueError, match="positive"):
        weighted_average([{"w": torch.ones(1)}, {"w": torch.ones(1)}], [100, -100])


def test_reply_bound_rejects_far_and_non_finite_replies_and_remembers_the_rest():
    bound = ReplyBound(10.0)
    assert bound.screen({"a": 1.0, "b": 1.5, "c": 1e6}) == {"c"}
    assert list(bound.history) == [1.0, 1.5]
    assert bound.screen({"a": 2.0, "b": math.nan, "c": 14.0}) == {"b"}  # median of 1, 1.5, 2, 14 is 1.75
    assert bound.screen({"a": 1.0, "c": 20.0}) == {"c"}  # with two replies the history decides
    assert ReplyBound(0.0).screen({"a": 1.0, "c": 1e30, "d": math.inf}) == {"d"}


def test_state_distance():
    a = {"w": torch.tensor([3.0, 0.0]), "n": torch.tensor(1)}
    b = {"w": torch.tensor([0.0, 4.0]), "n": torch.tensor(9)}
    assert state_distance(a, b) == 5.0


def test_the_hard_cap_bounds_every_ledger_entry_even_with_clipping_off():
    params = [torch.randn(50, generator=torch.Generator().manual_seed(0))]
    entry = LedgerEntry(1, (11, 12, 13), (1e11, -1e11, 5e10), 0.3, 1e-3)
    capped = cap_entry(entry, params, clip=0.0, cap=1000.0)
    assert estimate_norm(params, capped) == pytest.approx(1000.0, rel=1e-5)
    assert cap_entry(entry, params, clip=5.0, cap=1000.0).scalars == cap_entry(entry, params, clip=5.0).scalars
    small = LedgerEntry(1, (11,), (1e-6,), 0.3, 1e-3)
    assert cap_entry(small, params, clip=0.0, cap=1000.0) is small


class _Inflating(HOSFLClient):
    """Partition 2 smashes its batch three times over, so that its reply would carry three times the rows."""

    def draw_batch(self, server_round, step=None):
        batch = super().draw_batch(server_round, step)
        if self.settings.partition_id != 2:
            return batch
        return batch.take(torch.arange(len(batch)).repeat(3))


@pytest.mark.parametrize(
    ("strategy", "kept"),
    [
        ("hosfl", "smash-replies"),
        ("zo-sfl", "smash-replies"),
        ("heron-sfl", "replies"),
        ("cse-fsl", "replies"),
        ("fsl-sage", "replies"),
        ("mu-splitfed", "finished"),
    ],
)
def test_a_node_cannot_raise_its_own_weight_with_more_rows(strategy, kept):
    seen = []
    cfg = {"strategy": strategy, "num-server-rounds": 2, "eval-every": 2, "batch-size": 8, "zo.num-perturbations": 2}
    run_reference(cfg, 3, observe=lambda trace: seen.append(trace.metrics), client_class=_Inflating)
    assert [row["sampled"] for row in seen] == [3, 3]
    assert [row[kept] for row in seen] == [2, 2]  # partition 2's replies are rejected (wrong-count), not up-weighted


def test_splitfed_rejects_a_batch_with_more_rows_than_the_server_expects():
    seen = []
    cfg = {"strategy": "splitfed-v2", "num-server-rounds": 2, "eval-every": 2, "batch-size": 8}
    run_reference(cfg, 3, observe=lambda trace: seen.append(trace.metrics), client_class=_Inflating)
    assert [row["finished"] for row in seen] == [2, 2] and [row["samples"] for row in seen] == [16, 16]


@pytest.mark.parametrize("strategy", ["splitfed-v1", "mu-splitfed"])
@pytest.mark.parametrize("rule", ["mean", "median"])
def test_per_client_server_copies_are_combined_by_the_rule(strategy, rule):
    """SplitFed V1's server copies and MU-SplitFed's replicas are replies like any other: one copy that a
    poisoned batch pushed 1e3 away moves θ_s by a third of that under the mean, and not past the honest
    copies under the median."""
    from hosfl_flower.config import resolve_run_config
    from hosfl_flower.flower.strategy import HOSFLStrategy
    from hosfl_flower.protocols import NodeInfo
    from hosfl_flower.reference import InProcessLink, build_reference_nodes
    from hosfl_flower.task import server_model_and_test

    config = resolve_run_config(
        {"strategy": strategy, "results-dir": "", "clients-per-round": 3, "aggregation.rule": rule, "aggregation.reply-bound": 0}
    )
    model, test = server_model_and_test(config)
    protocol = HOSFLStrategy(model, test, config).protocol
    clients = build_reference_nodes(config, 3)
    nodes = [NodeInfo(p, p, len(c.train)) for p, c in clients.items()]
    honest: list[dict[str, torch.Tensor]] = []
    original_copies = protocol.split_server.copies

    def copies(count):
        made = original_copies(count)
        poisoned = made[-1]
        honest_state = poisoned.state

        def state():
            full = honest_state()
            return {**full, "weights": {k: v + 1e3 if v.is_floating_point() else v for k, v in full["weights"].items()}}

        poisoned.state = state
        for copy in made[:-1]:
            keep = copy.state
            copy.state = lambda _keep=keep: honest.append(_keep()["weights"]) or _keep()
        return made

    protocol.split_server.copies = copies
    protocol.run_round(1, nodes, InProcessLink(strategy, clients, 1))
    assert len(honest) == 2
    for name, value in model.server.state_dict().items():
        if not value.is_floating_point():
            continue
        low = torch.minimum(honest[0][name], honest[1][name])
        high = torch.maximum(honest[0][name], honest[1][name])
        if rule == "median":
            assert bool(((value >= low - 1e-6) & (value <= high + 1e-6)).all()), name
        else:
            assert bool((value > high + 100.0).all()), name
