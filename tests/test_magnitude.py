import torch

from mops.prune.magnitude import magnitude_mask


def test_unstructured_mask_zeroes_exactly_the_smallest_weights():
    torch.manual_seed(0)
    w = torch.randn(16, 32)
    mask = magnitude_mask(w, sparsity=0.75)
    assert mask.sum() == int(0.75 * w.numel())
    assert w[mask].abs().max() <= w[~mask].abs().min()


def test_nm_mask_prunes_n_smallest_of_every_m_consecutive_input_weights():
    torch.manual_seed(0)
    w = torch.randn(8, 24)
    for n, m in [(2, 4), (4, 8), (3, 4), (7, 8)]:
        mask = magnitude_mask(w, pattern=(n, m))
        groups_w = w.abs().reshape(8, -1, m)
        groups_mask = mask.reshape(8, -1, m)
        assert (groups_mask.sum(-1) == n).all()
        pruned_max = torch.where(groups_mask, groups_w, torch.zeros(())).amax(-1)
        kept_min = torch.where(groups_mask, torch.full((), float("inf")), groups_w).amin(-1)
        assert (pruned_max <= kept_min).all()
