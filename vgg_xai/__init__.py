"""vgg-xai: train and interpret a grid of VGG11-CIFAR variants on GPU clusters."""

__version__ = "0.1.0"
