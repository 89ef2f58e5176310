"""Indexer configuration, read once from `CBIR_INDEXER_*` environment variables."""

from pathlib import Path

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from cbir.settings import ServerSettings
from services.indexer.verification import Verification


class IndexerSettings(ServerSettings):
    """Server fields of `ServerSettings` plus what the indexer serves and how."""

    model_config = SettingsConfigDict(env_prefix="CBIR_INDEXER_", extra="forbid", validate_default=True)

    port: int = Field(50052, ge=0, le=65535, description="gRPC port")
    metrics_port: int | None = Field(9102, ge=0, le=65535, description="Prometheus /metrics port; unset = none")
    bundle: Path = Field(Path("bundles/demo"), description="bundle root (with `current`) or one version folder")
    max_k: int = Field(1000, ge=1, description="largest k a query may ask for")
    duplicates_workers: int = Field(2, ge=1, le=64, description="query threads of one FindDuplicates (a pass over "
                                    "every item: more finishes sooner and leaves fewer cores to searches)")
    prefault: bool = Field(False, description="read the whole Annoy file into memory at load (else on first use)")
    poll_seconds: float = Field(5.0, gt=0, description="how often to retry while the bundle is missing or broken")
    verify_checksums: bool = Field(
        True, description="check every bundle file's sha256 before serving (reads the whole bundle once)"
    )
    watch_seconds: float = Field(
        1.0, gt=0, description="how often to look for a changed `current` pointer or deletion list while serving"
    )
    warm_up: bool = Field(
        True, description="before SERVING (and before a reload is swapped in): read the index and item table "
        "into the page cache and run warm_up_queries queries"
    )
    warm_up_queries: int = Field(64, ge=0, description="queries run by the warm-up")
    model_fingerprint: str = Field(
        "", description="serve only bundles built with this model fingerprint (empty: any at start)"
    )
    allow_model_change: bool = Field(
        False, description="let a reload switch to a bundle built with another model than the live one"
    )
    # Geometric verification and match classes (services/indexer/verification.py); defaults measured on
    # devbench for the default descriptor (BENCHMARKS.md "Geometric verification", "Match classes").
    verify_top: int = Field(100, ge=0, le=1000, description="candidates verified with local features per query "
                            "(when the bundle and the query have them); 0 = no verification")
    verify_min_inliers: int = Field(10, ge=1, description="inliers that move a candidate to the front")
    verify_region_k: int = Field(10, ge=0, le=100, description="nearest items of each of a query's region "
                                 "vectors verified too (0 = region vectors ignored)")
    same_image_score: float = Field(0.97, ge=0, le=1, description="score from which a hit is the same image")
    copy_inliers: int = Field(12, ge=1, description="inliers from which a verified hit is a copy")
    copy_score: float = Field(0.95, ge=0, le=1, description="score from which an unverified hit is a copy")
    similar_score: float = Field(0.85, ge=0, le=1, description="score from which a hit is similar")

    def verification(self) -> Verification:
        return Verification(top=self.verify_top, min_inliers=self.verify_min_inliers, region_k=self.verify_region_k,
                            same_image_score=self.same_image_score, copy_inliers=self.copy_inliers,
                            copy_score=self.copy_score, similar_score=self.similar_score)
