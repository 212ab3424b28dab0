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
