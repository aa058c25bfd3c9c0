"""Compressed artifacts: the file a user ships.

    from pycompress import export
    info = export.save(model, "model.pcz")          # QAT codes, masks, folded BN; atomic
    net = export.load("model.pcz")                  # nn.Module in eval mode, ready to run
    export.read("model.pcz").manifest               # what is inside, without building it

``.pcz`` is a documented binary layout (``pycompress.export.format``) that never unpickles:
a header, a zlib-compressed JSON manifest, the encoded tensors and a SHA-256 of everything,
checked on load. ``pycompress.export.artifact`` says how each tensor is encoded;
``pycompress.export.onnx`` writes a QDQ ONNX graph for ONNX Runtime.
"""

from .artifact import (
    ENCODINGS,
    Artifact,
    ExportError,
    arch_of,
    decode,
    encode,
    layer_table,
    load,
    read,
    save,
)
from .fold import bn_affine, bn_fold_pairs
from .format import FORMAT_VERSION, ArtifactError
from .modules import QUANTIZED_LAYERS, QuantizedConv2d, QuantizedLinear

__all__ = [
    "save",
    "load",
    "read",
    "encode",
    "decode",
    "arch_of",
    "layer_table",
    "Artifact",
    "ArtifactError",
    "ExportError",
    "ENCODINGS",
    "FORMAT_VERSION",
    "bn_fold_pairs",
    "bn_affine",
    "QuantizedConv2d",
    "QuantizedLinear",
    "QUANTIZED_LAYERS",
    "is_artifact",
]


def is_artifact(path) -> bool:
    """Whether the file at ``path`` starts with the ``.pcz`` signature (no other check)."""
    from .format import SIGNATURE

    try:
        with open(path, "rb") as f:
            return f.read(len(SIGNATURE)) == SIGNATURE
    except OSError:
        return False
