"""Data curation on embedding arrays (DINOv2 Sec. 3; Vo et al., 2024): NumPy and faiss, no Keras backend.

Every function takes embeddings (N, dim) as a NumPy array or a memory map (`np.load(path, mmap_mode="r")`), reads
them in row chunks and compares rows by cosine similarity (rows are L2-normalized first):

    deduplicate            near-copies within a pool: k-NN pairs above a threshold, connected components, one kept
    decontaminate          pool items too close to an evaluation set
    retrieve               the k nearest pool items of every seed (sample-based retrieval)
    retrieve_by_cluster    whole k-means clusters of the pool that seeds fall in (cluster-based retrieval)
    hierarchical_kmeans    k-means of the points, then of the centroids, level by level (a ClusterTree)
    balanced_sample        a sample split evenly over the clusters of every level of a ClusterTree

and the pipeline around them, on images:

    embed_pool             a pool (folder, file list, tfds, digits, arrays) through a frozen backbone's CLS token
                           into resumable shards on disk; `load_embeddings` opens them as one memory-mapped view
    select_pool            the steps above in order, with a kept flag, a reason and cluster ids per image
    write_selection        a selection as a manifest (which `keras_dinov2.data.get_source` reads), report.json,
                           a cluster-size histogram and a grid of cluster members (PNG)

Example:
>>> pool = curation.embed_pool("/data/pool", "dinov2_vit_small14", "emb/")
>>> selection = curation.select_pool(pool, dedup_threshold=0.95, levels=(1000, 100), total=50_000)
>>> curation.write_selection(selection, pool, "curated/")    # then: pretrain --data curated/

>>> from keras_dinov2 import curation
>>> pool = np.load("pool.npy", mmap_mode="r")
>>> unique = curation.deduplicate(pool, threshold=0.95).kept_indices
>>> tree = curation.hierarchical_kmeans(pool[unique], levels=(1000, 100), seed=0)
>>> chosen = unique[curation.balanced_sample(tree, total=50_000, seed=0)]
"""

from keras_dinov2.curation.arrays import build_index
from keras_dinov2.curation.clustering import ClusterTree, assign, fit_kmeans, hierarchical_kmeans
from keras_dinov2.curation.dedup import DecontaminationResult, DedupResult, decontaminate, deduplicate
from keras_dinov2.curation.embed import backbone_identity, embed_pool, open_backbone
from keras_dinov2.curation.report import write_selection
from keras_dinov2.curation.retrieval import ClusterRetrievalResult, RetrievalResult, retrieve, retrieve_by_cluster
from keras_dinov2.curation.sampling import balanced_sample, split_budget
from keras_dinov2.curation.select import Selection, select_pool
from keras_dinov2.curation.store import PoolEmbeddings, load_embeddings
from keras_dinov2.curation.views import RowSubset, ShardedArray

__all__ = [
    "ClusterRetrievalResult",
    "ClusterTree",
    "DecontaminationResult",
    "DedupResult",
    "PoolEmbeddings",
    "RetrievalResult",
    "RowSubset",
    "Selection",
    "ShardedArray",
    "assign",
    "backbone_identity",
    "balanced_sample",
    "build_index",
    "decontaminate",
    "deduplicate",
    "embed_pool",
    "fit_kmeans",
    "hierarchical_kmeans",
    "load_embeddings",
    "open_backbone",
    "retrieve",
    "retrieve_by_cluster",
    "select_pool",
    "split_budget",
    "write_selection",
]
