"""Run by tests/test_compress.py under torchrun: a few DDP steps, then save this rank's weights."""

from __future__ import annotations

import sys

import torch

from compiler import train


class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(1, 4, 3, padding=1)
        self.bn = torch.nn.BatchNorm2d(4)
        self.fc0 = torch.nn.Linear(4 * 36, 3)
        self.fc1 = torch.nn.Linear(4 * 36, 3)

    def forward(self, x):
        h = torch.relu(self.bn(self.conv(x)))
        return [self.fc0(torch.flatten(h, 1)), self.fc1(torch.flatten(h * 2, 1))]


def main(out_dir: str) -> None:
    assert train.init_distributed()
    rank = train.rank()
    torch.manual_seed(0)  # same initial weights everywhere (DDP also broadcasts them)
    model = Net()

    def loader(epoch):
        g = torch.Generator().manual_seed(100 * epoch + rank)  # each rank: different data
        x = torch.randn(48, 1, 6, 6, generator=g)
        y = torch.randint(0, 3, (48,), generator=g)
        return torch.utils.data.DataLoader(list(zip(x, y)), batch_size=16)

    train.fit(model, loader, None, train.TrainConfig(epochs=2, lr=0.1, seed=0))
    torch.save(model.state_dict(), f"{out_dir}/rank{rank}.pt")
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
