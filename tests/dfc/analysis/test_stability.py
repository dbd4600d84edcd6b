"""Seed stability (dfc/analysis/stability.py): runs are matched one-to-one by decoder cosine, each finding is
clustered with its copies in the other runs, and a chance floor from random directions falls with the width."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from dfc.analysis.stability import (
    FeatureCluster,
    chance_threshold,
    cluster_findings,
    decoder_matrix,
    match_runs,
    null_match_cosines,
)
from dfc.config import CrosscoderConfig
from dfc.crosscoder import Crosscoder


def unit(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=-1, keepdim=True)


def noisy_copy(x: torch.Tensor, noise: float, g: torch.Generator) -> torch.Tensor:
    return unit(x + noise * torch.randn(x.shape, generator=g) / math.sqrt(x.shape[-1]))


def dfc(d_a: int = 6, d_b: int = 5) -> Crosscoder:
    torch.manual_seed(0)
    return Crosscoder(CrosscoderConfig(d_a=d_a, d_b=d_b, n_features=12, k=2, architecture="dfc", a_only=3, b_only=2))


# ----------------------------------------------------------------- decoder_matrix
def test_decoder_matrix_reads_each_models_rows_by_global_index():
    cc = dfc()
    c = cc.config
    with torch.no_grad():
        cc.w_dec_a.mul_(torch.arange(1, cc.w_dec_a.shape[0] + 1.0)[:, None])  # rows of different norms
    a_only, b_only = list(c.a_only_features), list(c.b_only_features)
    expected_a = unit(torch.stack([cc.w_dec_a[f].detach() for f in a_only]))
    expected_b = unit(torch.stack([cc.decoder_b()[f - cc.b_offset].detach() for f in b_only]))
    assert torch.allclose(decoder_matrix(cc, a_only, "a"), expected_a)
    assert torch.allclose(decoder_matrix(cc, b_only, "b"), expected_b)
    assert torch.allclose(decoder_matrix(cc, a_only, "a").norm(dim=1), torch.ones(len(a_only)))


def test_decoder_matrix_both_is_normalised_concatenation_of_unit_sides():
    cc = dfc()
    feature = cc.config.shared[1]
    with torch.no_grad():
        cc.w_dec_a[feature].mul_(7.0)  # the A side's scale must not outweigh B's
        cc.decoder_b()[feature - cc.b_offset].mul_(0.1)
    d_a, d_b = cc.decoder_directions(feature, raw_scale=False)
    expected = torch.cat([unit(d_a), unit(d_b)]) / math.sqrt(2.0)
    got = decoder_matrix(cc, [feature], "both")
    assert got.shape == (1, cc.config.d_a + cc.config.d_b)
    assert torch.allclose(got[0], expected, atol=1e-6)


def test_dead_decoder_row_gives_zeros_not_nan():
    cc = dfc()
    shared = list(cc.config.shared)
    with torch.no_grad():
        cc.w_dec_a[shared[0]].zero_()
        cc.decoder_b()[shared[1] - cc.b_offset].zero_()
        cc.w_dec_a[shared[2]].zero_()
        cc.decoder_b()[shared[2] - cc.b_offset].zero_()
    a = decoder_matrix(cc, shared, "a")
    both = decoder_matrix(cc, shared, "both")
    assert not a.isnan().any() and not both.isnan().any()
    assert torch.equal(a[0], torch.zeros(cc.config.d_a))
    assert torch.equal(both[2], torch.zeros(cc.config.d_a + cc.config.d_b))
    assert torch.isclose(both[0].norm(), torch.tensor(1.0))  # one live side still gives a unit direction
    match = match_runs(both, both)
    assert not match.cosine.isnan().any()


def test_decoder_matrix_rejects_a_feature_the_side_does_not_decode():
    cc = dfc()
    with pytest.raises(ValueError, match="no decoder for side 'b'"):
        decoder_matrix(cc, [cc.config.a_only_features[0]], "b")
    with pytest.raises(ValueError, match="no decoder for side 'both'"):
        decoder_matrix(cc, [cc.config.b_only_features[0]], "both")
    with pytest.raises(ValueError, match="side must be"):
        decoder_matrix(cc, [0], "c")  # type: ignore[arg-type]


# ----------------------------------------------------------------- match_runs
def test_matching_recovers_a_row_permutation_with_cosine_one():
    g = torch.Generator().manual_seed(1)
    ref = unit(torch.randn(10, 16, generator=g))
    perm = torch.randperm(10, generator=g)
    match = match_runs(ref, ref[perm])
    # other row j is ref row perm[j], so ref row i sits at the position of i in perm.
    assert torch.equal(match.ref_index, torch.arange(10))
    assert torch.equal(perm[match.other_index], torch.arange(10))
    assert torch.allclose(match.cosine, torch.ones(10), atol=1e-6)


@pytest.mark.parametrize("n_ref,n_other", [(4, 4), (3, 5), (5, 3)])
def test_matching_is_one_to_one_and_maximal_against_brute_force(n_ref, n_other):
    g = torch.Generator().manual_seed(n_ref * 10 + n_other)
    ref, other = unit(torch.randn(n_ref, 3, generator=g)), unit(torch.randn(n_other, 3, generator=g))
    cos = ref @ other.T
    match = match_runs(ref, other)
    assert len(match.ref_index) == min(n_ref, n_other)
    assert len(set(match.ref_index.tolist())) == len(set(match.other_index.tolist())) == min(n_ref, n_other)
    assert torch.allclose(match.cosine, cos[match.ref_index, match.other_index])
    if n_ref <= n_other:
        best = max(sum(cos[i, p[i]] for i in range(n_ref)) for p in itertools.permutations(range(n_other), n_ref))
    else:
        best = max(sum(cos[p[j], j] for j in range(n_other)) for p in itertools.permutations(range(n_ref), n_other))
    assert math.isclose(match.cosine.sum().item(), float(best), rel_tol=1e-5)


def test_matching_empty_inputs_gives_an_empty_match():
    match = match_runs(torch.empty(0, 8), unit(torch.randn(3, 8)))
    assert match.ref_index.numel() == match.other_index.numel() == match.cosine.numel() == 0


def test_matching_rejects_decoders_of_different_widths():
    with pytest.raises(ValueError, match="different widths"):
        match_runs(torch.randn(3, 8), torch.randn(3, 9))


# ----------------------------------------------------------------- cluster_findings
N, DIM, OFFSET = 8, 32, 100
"""Rows per run, width, and the global index of each run's first partition feature."""


def three_runs() -> tuple[list[torch.Tensor], list[list[int]], list[torch.Tensor]]:
    """Runs 1 and 2 are permuted noisy copies of run 0; run 2's copy of run 0's row 3 is a random direction.

    Returns decoders, global feature lists, and perms (run r's row j is run 0's row perms[r][j]).
    """
    g = torch.Generator().manual_seed(0)
    base = unit(torch.randn(N, DIM, generator=g))
    decoders, perms = [base], [torch.arange(N)]
    for run in (1, 2):
        perm = torch.randperm(N, generator=g)
        copy = noisy_copy(base, 0.3, g)[perm]
        if run == 2:
            copy[(perm == 3).nonzero().item()] = unit(torch.randn(DIM, generator=g))
        decoders.append(copy)
        perms.append(perm)
    features = [list(range(OFFSET, OFFSET + N)) for _ in range(3)]
    return decoders, features, perms


def copy_in(perms: list[torch.Tensor], run: int, base_row: int) -> int:
    """Global feature index of run ``run``'s copy of run 0's row ``base_row``."""
    return OFFSET + (perms[run] == base_row).nonzero().item()


def test_feature_replaced_by_a_random_direction_in_one_run_has_stability_two_thirds():
    decoders, features, perms = three_runs()
    clusters = cluster_findings(decoders, features, [(0, OFFSET + row) for row in range(N)], threshold=0.7)
    assert [c.representative for c in clusters] == [(0, OFFSET + row) for row in range(N)]
    for row, cluster in enumerate(clusters):
        if row == 3:
            assert cluster.stability == pytest.approx(2 / 3)
            assert set(cluster.members) == {0, 1}
        else:
            assert cluster.stability == 1.0
            # members carry global feature indices of the true copies, not row positions
            assert cluster.members[1].feature == copy_in(perms, 1, row)
            assert cluster.members[2].feature == copy_in(perms, 2, row)
            assert cluster.members[2].cosine > 0.7
        assert cluster.members[0].cosine == 1.0


def test_candidate_already_claimed_is_not_reported_again():
    decoders, features, perms = three_runs()
    candidates = [(0, OFFSET), (1, copy_in(perms, 1, 0)), (2, copy_in(perms, 2, 0)), (1, copy_in(perms, 1, 1))]
    clusters = cluster_findings(decoders, features, candidates, threshold=0.7)
    assert [c.representative for c in clusters] == [(0, OFFSET), (1, copy_in(perms, 1, 1))]
    assert clusters[1].members[0].feature == OFFSET + 1


def test_feature_found_in_one_run_only_is_still_returned_with_stability_one_third():
    decoders, features, perms = three_runs()
    lonely = (2, copy_in(perms, 2, 3))  # the random direction that replaced run 0's row 3
    clusters = cluster_findings(decoders, features, [(0, OFFSET + 3), lonely], threshold=0.7)
    assert clusters[1].representative == lonely
    assert set(clusters[1].members) == {2}
    assert clusters[1].stability == pytest.approx(1 / 3)


def test_threshold_above_every_cosine_leaves_every_finding_alone():
    decoders, features, _ = three_runs()
    candidates = [(run, OFFSET + row) for row in range(N) for run in range(3)]
    clusters = cluster_findings(decoders, features, candidates, threshold=1.01)
    assert len(clusters) == len(candidates)
    assert all(c.stability == pytest.approx(1 / 3) and c.n_runs == 3 for c in clusters)


def test_partners_join_the_representative_not_each_other_and_a_claimed_feature_never_joins_twice():
    # In one plane: z is 25.8° from x, y is 25.8° from z and 51.7° from x; threshold cos = 0.85.
    angle = math.acos(0.9)
    x, z, y = (torch.tensor([[math.cos(a), math.sin(a), 0.0]]) for a in (0.0, angle, 2 * angle))
    clusters = cluster_findings([x, y, z], [[0], [0], [0]], [(0, 0), (1, 0)], threshold=0.85)
    assert set(clusters[0].members) == {0, 2}  # y matches z (0.9) but not x (0.62): not pulled in via z
    assert clusters[1].representative == (1, 0)
    assert set(clusters[1].members) == {1}  # z is close enough to y but already belongs to x's cluster
    assert isinstance(clusters[1], FeatureCluster)


def test_candidate_outside_its_runs_partition_is_rejected():
    decoders, features, _ = three_runs()
    with pytest.raises(ValueError, match="not in that run's partition"):
        cluster_findings(decoders, features, [(0, 3)], threshold=0.7)
    with pytest.raises(ValueError, match="not in that run's partition"):
        cluster_findings(decoders, features, [(3, OFFSET)], threshold=0.7)


# ----------------------------------------------------------------- chance level
def test_null_matching_beats_a_single_random_pair_because_it_picks_the_best_partner():
    g = torch.Generator().manual_seed(0)
    decoder = unit(torch.randn(32, 16, generator=g))
    null = null_match_cosines(decoder, generator=g)
    single = (decoder * unit(torch.randn(32, 16, generator=g))).sum(dim=1)
    assert null.shape == (32,)
    assert null.mean() > single.abs().mean() + 0.2


def test_chance_threshold_falls_as_the_width_grows():
    g = torch.Generator().manual_seed(0)
    narrow = [unit(torch.randn(32, 16, generator=g)) for _ in range(2)]
    wide = [unit(torch.randn(32, 256, generator=g)) for _ in range(2)]
    assert chance_threshold(wide, generator=g) < chance_threshold(narrow, generator=g) - 0.2


def test_chance_threshold_is_below_the_cosine_of_genuinely_matched_noisy_copies():
    g = torch.Generator().manual_seed(0)
    base = unit(torch.randn(32, 64, generator=g))
    copy = noisy_copy(base, 0.5, g)
    floor = chance_threshold([base, copy], percentile=99.0, generator=g)
    assert match_runs(base, copy).cosine.min() > floor


def test_chance_threshold_of_no_rows_sets_no_floor():
    assert chance_threshold([torch.empty(0, 8)]) == -1.0
    with pytest.raises(ValueError, match="percentile"):
        chance_threshold([torch.randn(3, 8)], percentile=101.0)
