"""Images as sequences of patches: a k-means codebook of p x p patches, Pillow I/O, the UCI digits bundled."""

from multiar.domains.image.domain import ImageDomain

__all__ = ["ImageDomain"]
