"""The DICOM objects a region search writes back into the query's study, built with highdicom.

Each goes into a new series of the query's study (same patient, same study, so viewers show it
with the slide):

* **Parametric Map** (float32, TILED_SPARSE): the query region's heatmap, values in [0, 1], on
  the pixel grid of the level the region was read at, placed at the region in the slide's frame
  of reference (one total pixel matrix positioned by its top-left pixel; highdicom's
  ``tile_pixel_array`` wants pixel matrix position (1, 1) and the place in ``image_position``).
* **Comprehensive 3D SR** (TID 1500 Measurement Report): one measurement group per similar case,
  each with the query region as a closed polygon in slide coordinates (mm), the cosine
  similarity of the case's best tile and the region's tile it matched best (the search score;
  for a one-tile region it is the explanation's cosine of the region and that tile) (method:
  the saliency method as a code), and a reference to the case's whole-slide image by SOP Class
  and Instance UID.
* **Key Object Selection** ("Of Interest"): the similar slides.
* optionally a **Secondary Capture** (RGB): the heatmap blended over the region's pixels, for
  viewers that show neither Parametric Maps nor SR. It is a picture of the region, not placed on
  the slide (a Secondary Capture has no position in slide coordinates).

Cross-patient references
    Similar cases usually belong to other patients. The objects reference them by UID only: the
    datasets handed to highdicom for them hold nothing but Study / Series / SOP Instance and SOP
    Class UIDs, so no name, id or date of another patient can be copied in. Their demographics
    are never even read. Patient and study attributes come from the query slide alone.
    highdicom's KOS takes evidence from one other study at most; the KOS here lists every
    referenced study in its Current Requested Procedure Evidence Sequence, as PS3.3 C.17.6.2.1
    asks ("all Composite SOP Instances referenced in the Content Sequence").

Codes
    DICOM has no concepts for "similar case" or "Grad-CAM", so those are private codes of the
    coding scheme ``99HXP`` (identified in each object's Coding Scheme Identification Sequence).
"""

from __future__ import annotations

import importlib.metadata
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from histoxplain_model.errors import FailedPrecondition, InvalidRequest
from histoxplain_service.pacs.slides import WSI_SOP_CLASS_UID

__all__ = [
    "CODING_SCHEME",
    "RegionOnLevel",
    "SOP_CLASSES",
    "SimilarCase",
    "heatmap_map",
    "heatmap_overlay",
    "method_code",
    "region_polygon",
    "similar_cases_report",
    "similar_cases_selection",
    "warm_up",
]

CODING_SCHEME = "99HXP"
MANUFACTURER = "histoxplain"
#: Series numbers of the objects written back (any number is valid; fixed ones sort them together).
SERIES_NUMBERS = {"map": 9001, "report": 9002, "selection": 9003, "overlay": 9004}


def warm_up() -> None:
    """Load what highdicom reads on its first object (the standard's IOD and module tables,
    about 1 s on this machine), so the first request that stores results does not pay for it.
    Idempotent; the tables are highdicom's cached loaders (private API, checked to exist)."""
    import importlib

    for module in ("highdicom.ko", "highdicom.pm", "highdicom.sc", "highdicom.sr"):  # what the builders use
        importlib.import_module(module)
    from highdicom import _standard_utils as standard

    for loader in ("get_sop_class_iod_map", "get_iod_module_map", "get_module_attribute_map"):
        getattr(standard, loader, lambda: None)()


#: The SOP Class of each kind of object (what the builders make), for UIDs given out before building.
SOP_CLASSES = {
    "map": "1.2.840.10008.5.1.4.1.1.30",  # Parametric Map Storage
    "report": "1.2.840.10008.5.1.4.1.1.88.34",  # Comprehensive 3D SR Storage
    "selection": "1.2.840.10008.5.1.4.1.1.88.59",  # Key Object Selection Document Storage
    "overlay": "1.2.840.10008.5.1.4.1.1.7",  # Secondary Capture Image Storage
}


def _uids(uids: tuple[str, str] | None) -> tuple[str, str]:
    """The (Series, SOP Instance) UIDs an object gets: those given (made before building, for a
    write-back in the background), else new ones."""
    import highdicom as hd

    return uids if uids is not None else (hd.UID(), hd.UID())


def _version() -> str:
    try:
        return importlib.metadata.version("histoxplain")
    except importlib.metadata.PackageNotFoundError:
        return "0"


def _code(value: str, meaning: str) -> Any:
    from pydicom.sr.coding import Code

    return Code(value, CODING_SCHEME, meaning)


def method_code(method: str) -> Any:
    """The private code of a saliency method (``gradcam`` -> ``GRADCAM``)."""
    return _code(method.upper()[:16], f"{method} saliency of the embedding cosine similarity"[:64])


def _coding_schemes() -> list[Any]:
    import highdicom as hd

    return [
        hd.coding_schemes.CodingSchemeIdentificationItem(
            designator=CODING_SCHEME, name="histoxplain", responsible_organization="histoxplain"
        )
    ]


def _equipment() -> dict[str, Any]:
    return {"manufacturer": MANUFACTURER, "coding_schemes": _coding_schemes()}


@dataclass(frozen=True)
class SimilarCase:
    """A similar slide the objects reference: by UIDs only (see the module docstring).

    Attributes:
        rank: its place among the similar cases, from 1.
        similarity: cosine similarity of the case's best tile and the region's tile it matched
            best: the search score that ranked it (for a region of one tile, the explanation's
            cosine of the region and that tile).
        study_uid, series_uid, instance_uid: the case's image (the level its best tile came from).
    """

    rank: int
    similarity: float
    study_uid: str
    series_uid: str
    instance_uid: str
    sop_class_uid: str = WSI_SOP_CLASS_UID

    def reference(self) -> Any:
        """A dataset holding the UIDs only: what highdicom copies references from."""
        from pydicom.dataset import Dataset

        dataset = Dataset()
        dataset.StudyInstanceUID = self.study_uid
        dataset.SeriesInstanceUID = self.series_uid
        dataset.SOPInstanceUID = self.instance_uid
        dataset.SOPClassUID = self.sop_class_uid
        return dataset


@dataclass(frozen=True)
class RegionOnLevel:
    """The query region on the level it was read at.

    Attributes:
        source: that level's DICOM metadata (the query slide's image; no pixel data needed).
        x, y, width, height: the region in that level's pixels.
    """

    source: Any
    x: int
    y: int
    width: int
    height: int

    def frame_of_reference_uid(self) -> str:
        """The slide's Frame of Reference UID (FailedPrecondition: it declares none)."""
        value = self.source.get("FrameOfReferenceUID")
        if not value:
            raise FailedPrecondition(
                "the slide declares no Frame of Reference UID, so results cannot be placed on it; convert it "
                "again with a converter that writes one (docs/PACS.md)"
            )
        return str(value)

    def check_storable(self) -> None:
        """Refuse, before any work, a region whose Parametric Map cannot be written.

        Raises:
            FailedPrecondition: the slide declares no Frame of Reference UID.
            InvalidRequest: the region starts at the level's top-left pixel without covering the
                whole level: highdicom (0.28) takes a map placed at its source's origin, with the
                source's spacing and orientation, for a map of the whole total pixel matrix and
                refuses any other size.
        """
        self.frame_of_reference_uid()
        columns, rows = int(self.source.TotalPixelMatrixColumns), int(self.source.TotalPixelMatrixRows)
        if (self.x, self.y) == (0, 0) and (self.width, self.height) != (columns, rows):
            raise InvalidRequest(
                "region: results cannot be stored for a region that starts at the slide's top-left pixel "
                "(x = y = 0) unless it covers the whole level; start it at x >= 1 or y >= 1"
            )


def region_polygon(region: RegionOnLevel) -> np.ndarray:
    """The region's outline (5, 3) in slide coordinates (mm), closed: the outer edges of its pixels.

    Pixel indices address pixel centres (PS3.3 C.8.12.9: the total pixel matrix origin is the
    centre of the first pixel), so the edges are half a pixel outside them.
    """
    import highdicom as hd

    affine = hd.spatial.PixelToReferenceTransformer.for_image(region.source, for_total_pixel_matrix=True).affine
    left, top = region.x - 0.5, region.y - 0.5
    right, bottom = left + region.width, top + region.height
    corners = np.array([[left, top], [right, top], [right, bottom], [left, bottom], [left, top]], dtype=np.float64)
    homogeneous = np.column_stack([corners, np.zeros(len(corners)), np.ones(len(corners))])
    return (homogeneous @ affine.T)[:, :3]


def heatmap_map(
    region: RegionOnLevel, heatmap: np.ndarray, method: str, description: str, uids: tuple[str, str] | None = None
) -> Any:
    """A Parametric Map of ``heatmap`` (height, width) float32 in [0, 1] over the region.

    Raises:
        InvalidRequest: the heatmap does not have the region's size or is not in [0, 1].
        FailedPrecondition: the slide has no Frame of Reference UID.
    """
    import highdicom as hd
    from pydicom.sr.coding import Code

    heatmap = np.asarray(heatmap, dtype=np.float32)
    if heatmap.shape != (region.height, region.width):
        raise InvalidRequest(f"the heatmap is {heatmap.shape}; the region is {region.height}x{region.width} px")
    if not np.isfinite(heatmap).all() or heatmap.min() < 0 or heatmap.max() > 1:
        raise InvalidRequest("heatmap values must be finite and in [0, 1]")
    region.check_storable()
    source = region.source
    position = hd.spatial.PixelToReferenceTransformer.for_image(source, for_total_pixel_matrix=True)(
        np.array([[region.x, region.y]])
    )[0]
    spacing = [float(v) for v in source.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0].PixelSpacing]
    mapping = hd.pm.RealWorldValueMapping(
        lut_label=method[:16], lut_explanation=f"{method} saliency, 0 (none) to 1 (most)"[:64],
        unit=Code("1", "UCUM", "no units"), value_range=(0.0, 1.0), slope=1, intercept=0,
    )
    return hd.pm.ParametricMap(
        source_images=[source], pixel_array=heatmap[None], series_instance_uid=_uids(uids)[0],
        series_number=SERIES_NUMBERS["map"], sop_instance_uid=_uids(uids)[1], instance_number=1,
        manufacturer=MANUFACTURER, manufacturer_model_name="histoxplain", software_versions=_version(),
        device_serial_number="0", contains_recognizable_visual_features=False, real_world_value_mappings=[mapping],
        voi_lut_transformations=[hd.VOILUTTransformation(window_center=0.5, window_width=1.0)],
        content_label="HEATMAP", content_description=description[:64],
        pixel_measures=hd.PixelMeasuresSequence(pixel_spacing=spacing, slice_thickness=None),
        plane_orientation=hd.PlaneOrientationSequence(
            coordinate_system="SLIDE", image_orientation=[float(v) for v in source.ImageOrientationSlide]
        ),
        plane_positions=[
            hd.PlanePositionSequence(
                coordinate_system="SLIDE", image_position=[float(v) for v in position], pixel_matrix_position=(1, 1)
            )
        ],
        tile_pixel_array=True, tile_size=(256, 256), dimension_organization_type="TILED_SPARSE",
        series_description="histoxplain heatmap", coding_schemes=_coding_schemes(),
    )


def heatmap_overlay(
    region: RegionOnLevel, image: np.ndarray, heatmap: np.ndarray, method: str, description: str, alpha: float = 0.4,
    uids: tuple[str, str] | None = None,
) -> Any:
    """A Secondary Capture (RGB) of ``heatmap`` (h, w) in [0, 1] blended over ``image`` (h, w, 3)
    uint8, the region's pixels at the level read (:func:`histoxplain_model.overlay.overlay`, jet).

    Patient, study, specimen and container come from the query slide; the pixel spacing is the
    level's. Raises InvalidRequest: image or heatmap not of the region's size, or not in range.
    """
    import highdicom as hd

    from histoxplain_model.overlay import overlay

    if np.shape(image)[:2] != (region.height, region.width) or np.shape(heatmap) != (region.height, region.width):
        raise InvalidRequest(
            f"the image and heatmap must be the region's {region.height}x{region.width} px; "
            f"got {np.shape(image)} and {np.shape(heatmap)}"
        )
    source = region.source
    spacing = [float(v) for v in source.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0].PixelSpacing]
    picture = hd.sc.SCImage.from_ref_dataset(
        ref_dataset=source, pixel_array=overlay(image, heatmap, alpha), photometric_interpretation="RGB",
        bits_allocated=8, coordinate_system="SLIDE", series_instance_uid=_uids(uids)[0],
        series_number=SERIES_NUMBERS["overlay"], sop_instance_uid=_uids(uids)[1], instance_number=1,
        manufacturer=MANUFACTURER, pixel_spacing=(spacing[0], spacing[1]),
        container_identifier=str(source.ContainerIdentifier),
        specimen_descriptions=[hd.SpecimenDescription.from_dataset(item) for item in source.SpecimenDescriptionSequence],
    )
    picture.SeriesDescription = "histoxplain heatmap overlay"
    picture.ImageComments = f"{description}; {method} heatmap blended over the region ({alpha:g} opacity)"[:10240]
    picture.BurnedInAnnotation = "NO"
    picture.PatientOrientation = ""  # Type 2C, required here; a slide has no patient orientation: empty
    return picture


def similar_cases_report(
    region: RegionOnLevel, cases: Sequence[SimilarCase], method: str, uids: tuple[str, str] | None = None
) -> Any:
    """A Comprehensive 3D SR (TID 1500) with one measurement group per case.

    Raises:
        InvalidRequest: no case (a report of no measurement group is not a TID 1500 report).
    """
    import highdicom as hd
    from pydicom.sr.codedict import codes
    from pydicom.sr.coding import Code

    if not cases:
        raise InvalidRequest("a similar-case report needs at least one similar case")
    frame_of_reference_uid = region.frame_of_reference_uid()
    outline = hd.sr.ImageRegion3D(
        graphic_type=hd.sr.GraphicTypeValues3D.POLYGON, graphic_data=region_polygon(region),
        frame_of_reference_uid=frame_of_reference_uid,
    )
    groups = [
        hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations(
            tracking_identifier=hd.sr.TrackingIdentifier(uid=hd.UID(), identifier=f"similar case {case.rank}"),
            referenced_region=outline,
            finding_type=_code("SIMILARCASE", "Similar case"),
            measurements=[
                hd.sr.Measurement(
                    name=_code("SIMILARITY", "Embedding cosine similarity"), value=float(case.similarity),
                    unit=Code("1", "UCUM", "no units"), method=method_code(method),
                    referenced_images=[hd.sr.SourceImageForMeasurement(case.sop_class_uid, case.instance_uid)],
                )
            ],
        )
        for case in cases
    ]
    observer = hd.sr.ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=hd.UID(), name="histoxplain", manufacturer_name=MANUFACTURER
        ),
    )
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(observer_device_context=observer),
        procedure_reported=_code("SIMILARSEARCH", "Similar-case image search"),
        imaging_measurements=groups,
    )
    return hd.sr.Comprehensive3DSR(
        evidence=[region.source, *(case.reference() for case in cases)], content=report,
        series_instance_uid=_uids(uids)[0], series_number=SERIES_NUMBERS["report"], sop_instance_uid=_uids(uids)[1],
        instance_number=1, series_description="histoxplain similar cases", is_complete=True, **_equipment(),
    )


def similar_cases_selection(
    region: RegionOnLevel, cases: Sequence[SimilarCase], method: str, uids: tuple[str, str] | None = None
) -> Any:
    """A Key Object Selection ("Of Interest") of the cases' images.

    Raises:
        InvalidRequest: no case (a selection lists at least one object).
    """
    import highdicom as hd
    from pydicom.sr.codedict import codes

    if not cases:
        raise InvalidRequest("a key object selection needs at least one similar case")
    source = region.source
    references = [case.reference() for case in cases]
    # highdicom checks that every referenced object is in the evidence and keeps only evidence of
    # the document's own study: hand it same-study stand-ins, then list the real studies below.
    stand_ins = [case.reference() for case in cases]  # new datasets: their elements are not shared
    for stand_in in stand_ins:
        stand_in.StudyInstanceUID = source.StudyInstanceUID
    content = hd.ko.KeyObjectSelection(
        document_title=codes.DCM.OfInterest, referenced_objects=references,
        description=f"similar cases ({method})"[:1024],
    )
    selection = hd.ko.KeyObjectSelectionDocument(
        evidence=[source, *stand_ins],  # the first item gives the patient and study: the query's own
        content=content, series_instance_uid=_uids(uids)[0], series_number=SERIES_NUMBERS["selection"],
        sop_instance_uid=_uids(uids)[1], instance_number=1, series_description="histoxplain similar cases",
        **_equipment(),
    )
    selection.CurrentRequestedProcedureEvidenceSequence = _evidence(references)
    return selection


def _evidence(references: Sequence[Any]) -> list[Any]:
    """Hierarchical SOP Instance References (study -> series -> instance) of ``references``."""
    from pydicom.dataset import Dataset

    tree: dict[str, dict[str, list[Any]]] = defaultdict(lambda: defaultdict(list))
    for reference in references:
        tree[reference.StudyInstanceUID][reference.SeriesInstanceUID].append(reference)
    studies = []
    for study_uid, series in tree.items():
        study = Dataset()
        study.StudyInstanceUID = study_uid
        study.ReferencedSeriesSequence = []
        for series_uid, instances in series.items():
            item = Dataset()
            item.SeriesInstanceUID = series_uid
            item.ReferencedSOPSequence = []
            for instance in instances:
                sop = Dataset()
                sop.ReferencedSOPClassUID = instance.SOPClassUID
                sop.ReferencedSOPInstanceUID = instance.SOPInstanceUID
                item.ReferencedSOPSequence.append(sop)
            study.ReferencedSeriesSequence.append(item)
        studies.append(study)
    return studies
