"""Weight-space symmetries of QL-ConvNets: streams and their groups, transforms, compression.

See docs/architecture.md §5-6 for what holds: monomial groups on the factorised
forms (Eq.(3)-(7)), GL(n) or O(n) on the GL block (``glb``).
"""

from qlnas.symmetry.canonical import canonicalize
from qlnas.symmetry.compress import compress
from qlnas.symmetry.fold import fold_bn, randomize_bn
from qlnas.symmetry.groups import GROUPS, random_element
from qlnas.symmetry.streams import Stream, find_streams
from qlnas.symmetry.transform import apply
from qlnas.symmetry.verify import sample_transforms, verify

__all__ = [
    "GROUPS", "Stream", "apply", "canonicalize", "compress", "find_streams", "fold_bn",
    "random_element", "randomize_bn", "sample_transforms", "verify",
]
