"""The names of the API's enums: library name <-> ``histoxplain.v1`` enum value, written once.

The SDK converts with these tables and the gateway derives its own from them (it already
depends on this package for the generated stubs), so a name is never typed twice on the wire
path. ``*_UNSPECIFIED`` values are left out: the server fills in the defaults.
The server's library has the same names in ``histoxplain_model.vocabulary`` (the SDK installs
without it); a test compares the two and the proto enums.
"""

from __future__ import annotations

from histoxplain_client._proto.histoxplain.v1 import types_pb2

__all__ = ["HEATMAP_DTYPES", "METHODS", "POLARITIES", "RANKINGS", "SIDES", "TARGETS"]

METHODS = {
    "gradcam": types_pb2.EXPLANATION_METHOD_GRADCAM,
    "gradcampp": types_pb2.EXPLANATION_METHOD_GRADCAM_PLUS_PLUS,
    "smoothgrad": types_pb2.EXPLANATION_METHOD_SMOOTHGRAD,
    "simmap": types_pb2.EXPLANATION_METHOD_SIMMAP,
    "rise": types_pb2.EXPLANATION_METHOD_RISE,
}
POLARITIES = {"similar": types_pb2.POLARITY_SIMILAR, "dissimilar": types_pb2.POLARITY_DISSIMILAR}
SIDES = {
    "query": types_pb2.EXPLANATION_SIDE_QUERY,
    "retrieved": types_pb2.EXPLANATION_SIDE_RETRIEVED,
    "both": types_pb2.EXPLANATION_SIDE_BOTH,
}
TARGETS = {"cosine": types_pb2.EXPLANATION_TARGET_COSINE, "projection": types_pb2.EXPLANATION_TARGET_PROJECTION}
RANKINGS = {"tile": types_pb2.RANKING_LEVEL_TILE, "image": types_pb2.RANKING_LEVEL_IMAGE}
HEATMAP_DTYPES = {"float16": types_pb2.ARRAY_DTYPE_FLOAT16, "float32": types_pb2.ARRAY_DTYPE_FLOAT32}
