"""The demo in-process: the embedded model and the local index, through the domain."""

from __future__ import annotations

from histoxplain_service.app.demo.queries import DEMO_INDEX, DEMO_K, DEMO_RUNS, IHC_STRIDE, DemoQuery, demo_correspondences
from histoxplain_service.app.samples import HE_LABEL, IHC_LABEL, he_slide_path, ihc_image_path
from histoxplain_service.bootstrap import opened_retrieval
from histoxplain_service.config import Settings
from histoxplain_service.domain.retrieval import Retrieval
from histoxplain_service.domain.types import ExplainedSearch


def run_in_process(settings: Settings, queries: dict[str, DemoQuery]) -> tuple[list[ExplainedSearch], list[str]]:
    with opened_retrieval(settings) as retrieval:  # the engine is closed when the demo is done
        return _index_and_explain(retrieval, settings, queries)


def _index_and_explain(
    retrieval: Retrieval, settings: Settings, queries: dict[str, DemoQuery]
) -> tuple[list[ExplainedSearch], list[str]]:
    slide = retrieval.index_paths(DEMO_INDEX, [he_slide_path()], label=HE_LABEL)
    ihc = Retrieval(settings.with_changes(stride=IHC_STRIDE), retrieval.backend, retrieval.index_engine)
    ihc_summary = ihc.index_paths(DEMO_INDEX, [ihc_image_path()], label=IHC_LABEL)
    info = retrieval.describe(DEMO_INDEX)
    searches = [
        retrieval.search_and_explain(
            DEMO_INDEX, queries[name].image, DEMO_K, method, polarity, "both", correspondences=demo_correspondences(method)
        )
        for name, method, polarity in DEMO_RUNS
    ]
    notes = [
        f"encoder: {retrieval.model.preset} ({retrieval.model.architecture}, {retrieval.model.embedding_dim}-d), in-process",
        f"index '{DEMO_INDEX}': {info.n_points} tiles of {info.n_images} images "
        f"(slide: {len(slide.images)} indexed now or before, IHC: {len(ihc_summary.images)})",
    ]
    return searches, notes
