"""Data curation on embedding arrays (DINOv2 Sec. 3; Vo et al., 2024): NumPy and faiss, no Keras backend.

Every function takes embeddings (N, dim) as a NumPy array or a memory map (`np.load(path, mmap_mode="r")`), reads
them in row chunks and compares rows by cosine similarity (rows are L2-normalized first):

    deduplicate            near-copies within a pool: k-NN pairs above a threshold, connected components, one kept
    decontaminate          pool items too close to an evaluation set
    retrieve               the k nearest pool items of every seed (sample-based retrieval)
    retrieve_by_cluster    whole k-means clusters of the pool that seeds fall in (cluster-based retrieval)
    hierarchical_kmeans    k-means of the points, then of the centroids, level by level (a ClusterTree)
    balanced_sample        a sample split evenly over the clusters of every level of a ClusterTree

Example:
>>> from keras_dinov2 import curation
>>> pool = np.load("pool.npy", mmap_mode="r")
>>> unique = curation.deduplicate(pool, threshold=0.95).kept_indices
>>> tree = curation.hierarchical_kmeans(pool[unique], levels=(1000, 100), seed=0)
>>> chosen = unique[curation.balanced_sample(tree, total=50_000, seed=0)]
"""

from keras_dinov2.curation.arrays import build_index
from keras_dinov2.curation.clustering import ClusterTree, assign, fit_kmeans, hierarchical_kmeans
from keras_dinov2.curation.dedup import DecontaminationResult, DedupResult, decontaminate, deduplicate
from keras_dinov2.curation.retrieval import ClusterRetrievalResult, RetrievalResult, retrieve, retrieve_by_cluster
from keras_dinov2.curation.sampling import balanced_sample, split_budget

__all__ = [
    "ClusterRetrievalResult",
    "ClusterTree",
    "DecontaminationResult",
    "DedupResult",
    "RetrievalResult",
    "assign",
    "balanced_sample",
    "build_index",
    "decontaminate",
    "deduplicate",
    "fit_kmeans",
    "hierarchical_kmeans",
    "retrieve",
    "retrieve_by_cluster",
    "split_budget",
]
