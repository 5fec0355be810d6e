"""The spec of the tiny 8x8 one-channel ResNet-20 artefacts the loading tests write."""

CLASSES = [str(i) for i in range(10)]
SPEC = {
    "arch": "resnet20",
    "num_classes": 10,
    "in_channels": 1,
    "image_size": 8,
    "mean": [0.4],
    "std": [0.3],
    "classes": CLASSES,
}
