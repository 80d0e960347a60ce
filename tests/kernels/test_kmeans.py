"""k-means over keys per KV head: the Triton assignment against the torch reference, and Lloyd's rounds."""

import pytest
import torch

from kernel_testing import DEVICE, DTYPES
from localkv.kernels import kmeans, kmeans_assign, kmeans_assign_ref


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("H,N,K,D", [(2, 37, 5, 16), (1, 70, 20, 24), (3, 16, 16, 64)])
def test_assignment_is_the_nearest_centroid(kernel_ran, dtype, H, N, K, D):
    x = torch.randn(H, N, D, device=DEVICE).to(dtype)
    c = torch.randn(H, K, D, device=DEVICE).to(dtype)
    c[:, -1] = c[:, 0]                       # a tie: the lower id wins
    got = kmeans_assign(x, c, out=torch.full((H, N), -1, dtype=torch.long, device=DEVICE))
    kernel_ran("kmeans_assign")
    # centroid K-1 is centroid 0: the kernel must give 0, the reference's BLAS may round the two apart and give either
    want = kmeans_assign_ref(x, c)
    want = torch.where(want == K - 1, 0, want)
    # where fp32 sums of 16-bit products could order two nearly equal centroids differently, both are right
    cf, xf = c.float(), x.float()
    score = torch.einsum("hnd,hkd->hnk", xf, cf) - 0.5 * (cf * cf).sum(-1)[:, None]
    gap = score.gather(2, want[..., None]) - score.gather(2, got[..., None])
    assert (got == want).float().mean() > 0.95 and gap.abs().max() < 1e-2 * score.abs().max()
    if dtype == torch.float32:
        assert torch.equal(got, want)
    assert (got != K - 1).all()


def test_kmeans_finds_planted_clusters_and_returns_their_means():
    """Keys drawn around 8 well separated centres per head, each centre's keys a run of 10 to 22 tokens (a
    prompt's topics are contiguous, but not in runs of N/K): the seeds straddle the runs and the rounds move
    the boundaries; every key ends with its centre's others, each centroid the mean of its keys."""
    H, K, D = 2, 8, 32
    sizes = torch.randint(10, 23, (K,)).tolist()
    label = torch.repeat_interleave(torch.arange(K), torch.tensor(sizes)).to(DEVICE).expand(H, -1)   # (H, N)
    centres = 8 * torch.randn(H, K, D, device=DEVICE)
    x = centres.gather(1, label[..., None].expand(-1, -1, D)) + torch.randn(H, label.shape[1], D, device=DEVICE)
    centroids, assign = kmeans(x, K, iters=8)
    for h in range(H):   # the same partition, up to the clusters' names
        pairs = set(zip(label[h].tolist(), assign[h].tolist()))
        assert len(pairs) == K and len({a for _, a in pairs}) == K
        for k in range(K):
            torch.testing.assert_close(centroids[h, k], x[h, assign[h] == k].mean(0), rtol=1e-5, atol=1e-5)


def test_lloyd_rounds_never_raise_the_inertia():
    x = torch.randn(2, 96, 16, device=DEVICE)

    def inertia(c, a):
        return float(((x - c.gather(1, a[..., None].expand(-1, -1, 16))) ** 2).sum())

    values = [inertia(*kmeans(x, 6, iters=i)) for i in range(4)]
    assert all(b <= a + 1e-3 for a, b in zip(values, values[1:])), values
