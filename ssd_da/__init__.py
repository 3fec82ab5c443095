"""ssd_da: SSD300 on PASCAL VOC with attention-augmented ResNet backbones (DA, SE, ECA, SGE, CBAM)."""

__version__ = "0.1.0"
