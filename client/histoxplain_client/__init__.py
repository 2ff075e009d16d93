"""Python SDK for the histoxplain gRPC gateway: explainable similar-image search for histology.

    from histoxplain_client import Client

    with Client("127.0.0.1:50051") as client:
        hits = client.search("demo", "query.png", k=5)

Never imports torch; needs grpcio, protobuf, numpy and pillow.
"""

from __future__ import annotations

from histoxplain_client.aio import AsyncClient
from histoxplain_client.client import Client
from histoxplain_client.dicom import (
    DicomIndexSummary,
    DicomRegionExplanation,
    IndexedSeries,
    SkippedSeries,
    StoredDicomObject,
)
from histoxplain_client.errors import (
    ApiError,
    Cancelled,
    DeadlineExceeded,
    FailedPrecondition,
    Internal,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
    Unauthenticated,
    Unavailable,
)
from histoxplain_client.images import ImageInput, IndexImage, images_from_folder
from histoxplain_client.options import RiseOptions
from histoxplain_client.results import (
    Box,
    DeleteResult,
    DicomReference,
    ExplainedReference,
    Explanation,
    Faithfulness,
    Heatmap,
    Hit,
    IndexInfo,
    IndexSummary,
    MapFaithfulness,
    ModelInfo,
    RegionCorrespondence,
    SkippedImage,
)
from histoxplain_client.retry import NO_RETRY, RetryPolicy

__all__ = [
    "NO_RETRY",
    "ApiError",
    "AsyncClient",
    "Box",
    "Cancelled",
    "Client",
    "DeadlineExceeded",
    "DeleteResult",
    "DicomIndexSummary",
    "DicomReference",
    "DicomRegionExplanation",
    "ExplainedReference",
    "Explanation",
    "FailedPrecondition",
    "Heatmap",
    "Hit",
    "ImageInput",
    "IndexImage",
    "IndexInfo",
    "IndexedSeries",
    "IndexSummary",
    "Internal",
    "InvalidArgument",
    "ModelInfo",
    "NotFound",
    "PermissionDenied",
    "RegionCorrespondence",
    "Faithfulness",
    "MapFaithfulness",
    "ResourceExhausted",
    "RetryPolicy",
    "RiseOptions",
    "SkippedImage",
    "SkippedSeries",
    "StoredDicomObject",
    "Unauthenticated",
    "Unavailable",
    "images_from_folder",
]
__version__ = "0.1.0"
