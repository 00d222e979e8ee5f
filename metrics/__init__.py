"""Diversity metrics over image embeddings, embedders loaded from local files, and the
quality–diversity sweep helpers. Importable without a server."""
from .diversity import (DiversityError, DiversityReport, cosine_diversity, group_ids,
                        mean_pairwise_distance, vendi_score)

__all__ = ["DiversityError", "DiversityReport", "cosine_diversity", "group_ids", "mean_pairwise_distance",
           "vendi_score"]
