"""NPID with your own model and training loop: a torchvision ResNet-18, an ordinary DataLoader,
oocid's on-disk memory bank and its loss. Every image is its own class, so the loader yields
each image's index. Run: python examples/own_loop.py [BANK_PATH] [EPOCHS]"""

import sys

import torch
import torch.nn.functional as F
import torchvision
import torchvision.transforms as T
from torch.utils.data import DataLoader, Dataset

from oocid import NPIDLoss, OnDiskBank


class Indexed(Dataset):
    def __init__(self, images: Dataset) -> None:
        self.images = images

    def __len__(self) -> int:
        return len(self.images)  # type: ignore[arg-type]

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.images[i][0], i  # (augmented image, its index in the bank)


augment = T.Compose([T.RandomResizedCrop(32, scale=(0.2, 1.0)), T.ToTensor()])
data = Indexed(torchvision.datasets.FakeData(512, (3, 32, 32), transform=augment))
loader = DataLoader(data, batch_size=64, shuffle=True, drop_last=True)
model = torchvision.models.resnet18(num_classes=128)  # the fc layer maps to 128-d features
optimizer = torch.optim.SGD(model.parameters(), lr=0.03, momentum=0.9, weight_decay=5e-4)
bank_path = sys.argv[1] if len(sys.argv) > 1 else "bank.zarr"
epochs = int(sys.argv[2]) if len(sys.argv) > 2 else 1
with OnDiskBank.open(bank_path, n_rows=len(data), chunk_rows=128,
                     steps_per_epoch=len(loader)) as bank:
    criterion = NPIDLoss(bank, kind="infonce", k=256, temperature=0.07)
    # A second run on the bank continues its step count (commit refuses a step that goes back).
    # A real loop also saves the model and optimiser with each commit and loads them here, so
    # the model goes on with the bank it trained (torch.save({"step": step, "model": ...})).
    step = max(bank.committed_step, 0)
    for epoch in range(epochs):
        for images, index in loader:
            features = F.normalize(model(images), dim=1)  # (B, 128), unit length
            loss = criterion(features, index)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            criterion.update(features, index)  # the bank's momentum update, after the step
            step += 1
        print(f"epoch {epoch + 1}: loss {loss.item():.3f}")
        bank.commit(step)  # the epoch's rows reach the disk all together, or not at all
