"""Help texts of the `oocid` command too long to sit beside their options in app.py."""

VERIFY_HELP = ("Check every shard's sha256 against its manifest before use: finds a shard that "
               "changed after `oocid shard` (reads each shard once more).")


EXPORT_HELP = (
    "Export the trained backbone as a state dict for torchvision or your own code.\n\n"
    "It loads with torch.load(PATH, weights_only=True) and strict=True into the model built as "
    "below.\n\n"
    "Keys: every parameter and buffer of the backbone (conv1, bn1, layer1-4 with BN running "
    "statistics; features.* for small), none of the fc.* projection head unless --head.\n\n"
    "resnet18 / resnet50: m = torchvision.models.resnet18() (resnet50()); m.fc = nn.Identity() "
    "-> (B, 512) / (B, 2048) pooled pre-fc features. A 1-channel checkpoint also needs "
    "m.conv1 = nn.Conv2d(1, 64, 7, 2, 3, bias=False).\n\n"
    "cifar_resnet18: as resnet18, plus m.conv1 = nn.Conv2d(C, 64, 3, 1, 1, bias=False) and "
    "m.maxpool = nn.Identity().\n\n"
    "small: m = oocid.models.SmallConvNet(C); m.fc = nn.Identity() -> (B, 128).\n\n"
    "--head: keep fc; build with num_classes=D (the checkpoint's dim, 128 by default; "
    "SmallConvNet(C, out_dim=D)) and no m.fc = nn.Identity(): the un-normalised D-dim embedding.")
