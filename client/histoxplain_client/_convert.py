"""Request builders and response decoders shared by Client and AsyncClient (protobuf stays here)."""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator, Mapping, Sequence

from histoxplain_client._proto.histoxplain.v1 import retrieval_service_pb2 as pb
from histoxplain_client._proto.histoxplain.v1 import types_pb2
from histoxplain_client.arrays import decode_array
from histoxplain_client.images import ImageInput, IndexImage, encode_image
from histoxplain_client.enums import HEATMAP_DTYPES, METHODS, POLARITIES, RANKINGS, SIDES, TARGETS
from histoxplain_client.options import RiseOptions
from histoxplain_client.results import (
    Box,
    DeleteResult,
    DicomReference,
    ExplainedReference,
    Faithfulness,
    MapFaithfulness,
    RegionCorrespondence,
    Explanation,
    Heatmap,
    Hit,
    IndexInfo,
    IndexSummary,
    ModelInfo,
    SkippedImage,
)

def _enum_value(kind: str, names: dict[str, int], name: str) -> int:
    if name not in names:
        raise ValueError(f"unknown {kind} {name!r}; known: {', '.join(names)}")
    return names[name]


def _enum_name(names: dict[str, int], value: int, default: str) -> str:
    """The SDK name of an enum value; UNSPECIFIED is the API's documented default."""
    if value == 0:
        return default
    for name, number in names.items():
        if number == value:
            return name
    return f"unknown({value})"


def explain_options(
    method: str,
    polarity: str,
    side: str,
    heatmap_dtype: str,
    smoothgrad_samples: int,
    smoothgrad_noise: float | None,
    rise: RiseOptions | None = None,
    target: str = "cosine",
    correspondences: int = 0,
    verify: bool = False,
) -> types_pb2.ExplainOptions:
    if smoothgrad_samples < 0:
        raise ValueError(f"smoothgrad_samples must be >= 0, got {smoothgrad_samples}")
    if correspondences < 0:
        raise ValueError(f"correspondences must be >= 0 (0: none), got {correspondences}")
    options = types_pb2.ExplainOptions(
        method=_enum_value("method", METHODS, method),
        polarity=_enum_value("polarity", POLARITIES, polarity),
        side=_enum_value("side", SIDES, side),
        heatmap_dtype=_enum_value("heatmap dtype", HEATMAP_DTYPES, heatmap_dtype),
        smoothgrad_samples=smoothgrad_samples,
        target=_enum_value("target", TARGETS, target),
        correspondences=correspondences,
        verify=verify,
    )
    if smoothgrad_noise is not None:
        options.smoothgrad_noise = smoothgrad_noise
    if rise is not None:
        options.rise.CopyFrom(rise.to_proto())
    return options


#: What ``Client.search(filter=...)`` accepts: ``{payload key: accepted value or values}``.
FilterInput = Mapping[str, "str | int | Sequence[str | int]"]


def tile_filter(filter: FilterInput | None) -> types_pb2.TileFilter | None:
    """``{"label": "TUM", "organ": ["skin", "colon"]}`` -> the request's filter: every key must
    match (AND), one of a key's values is enough (OR). Integers (``level``) are sent as decimal
    text. The gateway checks the limits (see ``types.proto``); ``None`` or ``{}``: no filter."""
    if not filter:
        return None
    if not isinstance(filter, Mapping):
        raise TypeError(f"filter must be a mapping of payload key to value(s), not {type(filter).__name__}")
    conditions = []
    for key, value in filter.items():
        if not isinstance(key, str):
            raise TypeError(f"filter keys must be str, not {type(key).__name__}")
        values = [value] if isinstance(value, (str, int)) else list(value)
        if not values:
            raise ValueError(f"filter on {key!r} has no values; give at least one")
        for item in values:
            if isinstance(item, bool) or not isinstance(item, (str, int)):
                # named by type only: values may carry patient data
                raise TypeError(f"filter values for {key!r} must be str (or int), not {type(item).__name__}")
        conditions.append(types_pb2.FieldCondition(key=key, values=[str(item) for item in values]))
    return types_pb2.TileFilter(conditions=conditions)


def search_request(
    index: str, image: ImageInput, k: int, ranking: str, filter: FilterInput | None = None
) -> pb.SearchRequest:
    return pb.SearchRequest(
        index=index, image=encode_image(image), k=_check_k(k), ranking=_enum_value("ranking", RANKINGS, ranking),
        filter=tile_filter(filter),
    )


def search_and_explain_request(
    index: str, image: ImageInput, k: int, ranking: str, options: types_pb2.ExplainOptions,
    filter: FilterInput | None = None,
) -> pb.SearchAndExplainRequest:
    return pb.SearchAndExplainRequest(
        index=index,
        image=encode_image(image),
        k=_check_k(k),
        ranking=_enum_value("ranking", RANKINGS, ranking),
        options=options,
        filter=tile_filter(filter),
    )


def explain_request(
    query: ImageInput,
    index: str | None,
    image_ids: Sequence[str],
    point_ids: Sequence[str],
    references: Sequence[ImageInput],
    k: int,
    options: types_pb2.ExplainOptions,
) -> pb.ExplainRequest:
    """Exactly one kind of reference: indexed (``index`` + ids) or images sent along."""
    if isinstance(image_ids, str) or isinstance(point_ids, str):
        raise TypeError("image_ids and point_ids are sequences of ids, not one string")
    if k < 0:
        raise ValueError(f"k must be >= 0 (0: all references), got {k}")
    request = pb.ExplainRequest(query_image=encode_image(query), k=k, options=options)
    indexed = bool(image_ids) or bool(point_ids)
    if indexed and references:
        raise ValueError("give either indexed references (image_ids / point_ids) or reference images, not both")
    if indexed:
        if not index:
            raise ValueError("image_ids / point_ids need the index they belong to (index=...)")
        request.indexed.CopyFrom(
            pb.IndexedReferences(index=index, image_ids=list(image_ids), point_ids=list(point_ids))
        )
    elif references:
        request.images.CopyFrom(pb.ReferenceImages(images=[encode_image(ref) for ref in references]))
    else:
        raise ValueError("nothing to explain against: give image_ids, point_ids or references")
    return request


def _check_k(k: int) -> int:
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    return k


def tiling_options(tile_size: int, stride: int, min_tissue_fraction: float | None) -> types_pb2.TilingOptions:
    if tile_size < 0 or stride < 0:
        raise ValueError(f"tile_size and stride must be >= 0 (0: server default), got {tile_size}, {stride}")
    tiling = types_pb2.TilingOptions(tile_size=tile_size, stride=stride)
    if min_tissue_fraction is not None:
        if not 0.0 <= min_tissue_fraction <= 1.0:
            raise ValueError(f"min_tissue_fraction must be in [0, 1], got {min_tissue_fraction}")
        tiling.min_tissue_fraction = min_tissue_fraction
    return tiling


def index_requests(
    index: str, images: Iterable[IndexImage | ImageInput], tiling: types_pb2.TilingOptions
) -> Iterator[pb.IndexImagesRequest]:
    """The IndexImages stream: the config, then one message per image, each read when sent."""
    yield pb.IndexImagesRequest(config=pb.IndexImagesConfig(index=index, tiling=tiling))
    for item in images:
        yield pb.IndexImagesRequest(image=image_record(item))


def image_record(item: IndexImage | ImageInput) -> types_pb2.ImageRecord:
    record = item if isinstance(item, IndexImage) else IndexImage(image=item)
    source = record.source
    if not source and isinstance(record.image, (str, os.PathLike)):
        source = os.fspath(record.image)
    message = types_pb2.ImageRecord(
        image_id=record.image_id, content=encode_image(record.image), label=record.label, source=source,
        metadata=dict(record.metadata or {}),
    )
    if record.mpp is not None:
        message.mpp = record.mpp
    return message


def decode_hit(message: types_pb2.SearchHit) -> Hit:
    return Hit(
        score=message.score,
        image_id=message.image_id,
        point_id=message.point_id,
        label=message.label,
        source=message.source,
        box=Box(message.box.x, message.box.y, message.box.width, message.box.height),
        level=message.level,
        mpp=message.mpp if message.HasField("mpp") else None,
        matched_tiles=message.matched_tiles,
        dicom=_decode_dicom(message.dicom) if message.HasField("dicom") else None,
        metadata=dict(message.metadata),
    )


def _decode_dicom(message: types_pb2.DicomReference) -> DicomReference:
    return DicomReference(
        message.study_instance_uid, message.series_instance_uid, message.sop_instance_uid,
        message.frame_of_reference_uid,
    )


def decode_hits(response: pb.SearchResponse) -> list[Hit]:
    return [decode_hit(hit) for hit in response.hits]


def _decode_heatmap(message: types_pb2.Heatmap) -> Heatmap:
    return Heatmap(values=decode_array(message.values), overlay_png=message.overlay_png)


def _decode_reference(message: types_pb2.ExplainedReference) -> ExplainedReference:
    return ExplainedReference(
        reference_index=message.reference_index,
        hit=decode_hit(message.hit) if message.HasField("hit") else None,
        similarity=message.similarity,
        query_heatmap=_decode_heatmap(message.query_heatmap) if message.HasField("query_heatmap") else None,
        reference_heatmap=(
            _decode_heatmap(message.reference_heatmap) if message.HasField("reference_heatmap") else None
        ),
        correspondences=tuple(_decode_correspondence(pair) for pair in message.correspondences),
        faithfulness=_decode_faithfulness(message.faithfulness) if message.HasField("faithfulness") else None,
    )


def _decode_faithfulness(message: types_pb2.Faithfulness) -> Faithfulness:
    def curves(field: str) -> MapFaithfulness | None:
        if not message.HasField(field):
            return None
        part = getattr(message, field)
        return MapFaithfulness(part.deletion_auc, part.insertion_auc, part.random_deletion_auc, part.random_insertion_auc)

    return Faithfulness(steps=message.steps, query=curves("query"), reference=curves("reference"))


def _decode_box(message: types_pb2.Box) -> Box:
    return Box(message.x, message.y, message.width, message.height)


def _decode_correspondence(message: types_pb2.RegionCorrespondence) -> RegionCorrespondence:
    return RegionCorrespondence(
        query_box=_decode_box(message.query_box),
        reference_box=_decode_box(message.reference_box),
        share=message.share,
        rank=message.rank,
    )


def decode_explanation(response: pb.ExplainResponse | pb.SearchAndExplainResponse) -> Explanation:
    references = response.references if isinstance(response, pb.ExplainResponse) else response.results
    return Explanation(
        method=_enum_name(METHODS, response.options.method, "gradcam"),
        polarity=_enum_name(POLARITIES, response.options.polarity, "similar"),
        side=_enum_name(SIDES, response.options.side, "both"),
        references=tuple(_decode_reference(reference) for reference in references),
    )


def decode_index_summary(response: pb.IndexImagesResponse) -> IndexSummary:
    return IndexSummary(
        index=response.index,
        images_received=response.images_received,
        images_indexed=response.images_indexed,
        tiles_indexed=response.tiles_indexed,
        background_tiles_skipped=response.background_tiles_skipped,
        skipped=tuple(
            SkippedImage(
                position=skipped.position,
                image_id=skipped.image_id,
                reason=_skip_reason(skipped.reason),
                message=skipped.message,
            )
            for skipped in response.skipped
        ),
    )


def _skip_reason(value: int) -> str:
    """SKIP_REASON_NO_TISSUE -> "no_tissue"."""
    try:
        return types_pb2.SkipReason.Name(value).removeprefix("SKIP_REASON_").lower()
    except ValueError:
        return f"unknown({value})"


def delete_request(index: str, image_ids: Sequence[str]) -> pb.DeleteImagesRequest:
    if isinstance(image_ids, str):
        raise TypeError("image_ids is a sequence of ids, not one string")
    if not image_ids:
        raise ValueError("no image ids to delete")
    return pb.DeleteImagesRequest(index=index, image_ids=list(image_ids))


def decode_delete(response: pb.DeleteImagesResponse) -> DeleteResult:
    return DeleteResult(
        images_deleted=response.images_deleted,
        tiles_deleted=response.tiles_deleted,
        missing_image_ids=tuple(response.missing_image_ids),
    )


def decode_index_info(message: types_pb2.IndexInfo) -> IndexInfo:
    return IndexInfo(
        name=message.name,
        encoder_preset=message.encoder_preset,
        embedding_dim=message.embedding_dim,
        tile_count=message.tile_count,
        image_count=message.image_count,
    )


def decode_model_info(response: pb.GetModelInfoResponse) -> ModelInfo:
    model = response.model
    return ModelInfo(
        preset=model.preset,
        architecture=model.architecture,
        embedding_dim=model.embedding_dim,
        input_size=(model.input_height, model.input_width),
        methods=tuple(_enum_name(METHODS, method, "gradcam") for method in model.methods),
        backend=model.backend,
        server_version=response.server_version,
    )
