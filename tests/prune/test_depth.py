"""Depth pruning: a residual branch replaced by its mean output, the shortcut untouched."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from edgeslim.errors import PruneError
from edgeslim.graph.branches import residual_branches
from edgeslim.prune.depth import BranchMean, Bypassed, remove_branches, removed_modules
from edgeslim.zoo import load_zoo_model


def test_removed_resnet_block_is_its_shortcut_plus_the_batchnorm_shift() -> None:
    model = load_zoo_model("resnet20").eval()
    x = torch.randn(2, 1, 28, 28)
    branch = next(b for b in residual_branches(model, (x[:1],)) if b.name == "layer2.1")
    before = sum(p.numel() for p in model.parameters())
    block = model.layer2[1]
    beta = block.bn2.bias.detach().clone()
    remove_branches(model, [branch])
    with torch.no_grad():
        model(x)
        # the block is relu(z + beta); its shared in-place ReLU, which the removed branch
        # still applies to what reaches it, leaves the shortcut's z (negative too) alone
        z = torch.randn(2, 32, 14, 14)
        kept = z.clone()
        assert torch.equal(block(z), torch.relu(kept + beta.view(1, -1, 1, 1)))
        assert torch.equal(z, kept)
    assert isinstance(block.bn2, BranchMean) and isinstance(block.conv1, Bypassed)
    assert removed_modules(model) == {f"layer2.1.{n}" for n in ("conv1", "bn1", "conv2", "bn2")}
    removed = sum(p.numel() for n in ("conv1", "bn1", "conv2", "bn2") for p in
                  load_zoo_model("resnet20").layer2[1].get_submodule(n).parameters())  # fmt: skip
    # what stays of the branch: one trainable constant per channel
    assert sum(p.numel() for p in model.parameters()) == before - removed + beta.numel()


class _MLPBlock(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(8, 16), nn.Linear(16, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.fc2(torch.relu(self.fc1(x)))


def test_a_branch_without_batchnorm_gets_its_measured_mean_and_needs_data() -> None:
    torch.manual_seed(0)
    model = _MLPBlock().eval()
    batches = [torch.randn(4, 5, 8) for _ in range(3)]
    (branch,) = residual_branches(model, (batches[0][:1],))
    with pytest.raises(PruneError, match="calibration data"):
        remove_branches(_MLPBlock(), [branch])
    with torch.no_grad():
        outs = torch.cat([model.fc2(torch.relu(model.fc1(b))).reshape(-1, 8) for b in batches])
    remove_branches(model, [branch], batches)
    x = torch.randn(2, 5, 8)
    with torch.no_grad():
        torch.testing.assert_close(model(x), x + outs.mean(0), rtol=1e-5, atol=1e-6)


def _fashion(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    from edgeslim.data import load_fashion_mnist

    split = load_fashion_mnist("val", limit=n)
    return split.images, split.labels


def test_depth_prune_reaches_the_target_with_the_branches_that_matter_least() -> None:
    from edgeslim.data import TensorBatches
    from edgeslim.errors import UnreachableTargetError
    from edgeslim.graph import layer_table, total_macs
    from edgeslim.prune.depth import branch_importance, depth_prune_, removable_branches
    from edgeslim.train.loop import evaluate

    images, labels = _fashion(512)
    batches = TensorBatches(images[:256], batch_size=64)
    held = TensorBatches(images[256:], labels[256:], batch_size=256)
    x = (images[:1],)
    base = load_zoo_model("resnet20").eval()
    scores = branch_importance(base, removable_branches(base, x), batches)
    model, removed, reached = depth_prune_(load_zoo_model("resnet20").eval(), x, batches, 0.2)
    assert reached >= 0.2  # met, and the record states what was reached
    assert reached == pytest.approx(1 - total_macs(layer_table(model, *x)) / 31_021_952)
    assert len(removed) == 2  # each branch holds 8.7-11.6% of resnet20's MACs
    table = layer_table(base, *x)
    share = {b.name: sum(table[f].macs for f in b.modules) / 31_021_952
             for b in removable_branches(base, x)}  # fmt: skip
    reaching = [(a, b) for a in share for b in share if a < b and share[a] + share[b] >= 0.2]
    # no other pair reaching the target changes the outputs less (one branch cannot)
    best = min(scores[a] + scores[b] for a, b in reaching)
    assert sum(scores[n] for n in removed) == pytest.approx(best)
    worst = sorted(scores, key=scores.__getitem__)[-2:]
    worst_model = remove_branches(
        load_zoo_model("resnet20").eval(),
        [b for b in removable_branches(base, x) if b.name in worst],
    )
    assert evaluate(model, held) > evaluate(worst_model.eval(), held) + 5
    with pytest.raises(UnreachableTargetError, match="residual branches"):
        depth_prune_(load_zoo_model("resnet20").eval(), x, batches, 0.995)


def test_cheapest_cover_prefers_the_least_score_that_reaches_the_target() -> None:
    from edgeslim.prune.depth import _cheapest_cover

    # greedy by score would take 0 (0.05 of the MACs) then need another; one branch of
    # 0.12 alone reaches 0.1 for less
    assert _cheapest_cover([0.05, 0.12, 0.12], [0.1, 0.15, 0.5], 0.1) == [1]
    assert sorted(_cheapest_cover([0.05, 0.06, 0.12], [0.1, 0.1, 0.5], 0.1)) == [0, 1]
